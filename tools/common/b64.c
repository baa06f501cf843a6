#include "b64.h"

#include <stdbool.h>

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t b64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = alphabet[v >> 18];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = alphabet[(v >> 6) & 63];
        out[o++] = alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = alphabet[v >> 18];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = alphabet[v >> 18];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = alphabet[(v >> 6) & 63];
        out[o++] = '=';
    }
    return o;
}

static int val(char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

long b64_decoded_len(const char *in, size_t n)
{
    if (n % 4)
        return -1;
    size_t pad = 0;
    if (n && in[n - 1] == '=')
        pad = n >= 2 && in[n - 2] == '=' ? 2 : 1;
    return (long)(n / 4 * 3 - pad);
}

long b64_decode(const char *in, size_t n, uint8_t *out)
{
    if (n % 4)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        int a = val(in[i]), b = val(in[i + 1]), c, d;
        if (a < 0 || b < 0)
            return -1;
        bool last = i + 4 == n;
        if (last && in[i + 2] == '=' && in[i + 3] == '=') {
            if (b & 15)
                return -1;
            out[o++] = (uint8_t)(a << 2 | b >> 4);
            break;
        }
        c = val(in[i + 2]);
        if (c < 0)
            return -1;
        if (last && in[i + 3] == '=') {
            if (c & 3)
                return -1;
            out[o++] = (uint8_t)(a << 2 | b >> 4);
            out[o++] = (uint8_t)((b & 15) << 4 | c >> 2);
            break;
        }
        d = val(in[i + 3]);
        if (d < 0)
            return -1;
        out[o++] = (uint8_t)(a << 2 | b >> 4);
        out[o++] = (uint8_t)((b & 15) << 4 | c >> 2);
        out[o++] = (uint8_t)((c & 3) << 6 | d);
    }
    return (long)o;
}
