/* Standard base64 (RFC 4648 §4, padded) for tunnel data messages: the
 * ThingWorx C SDK sends and expects one padded unit per message. The
 * decoder is strict: no whitespace, no line breaks, padding only at the
 * end, and the unused bits of the last group must be zero. */
#ifndef EMX_TOOLS_B64_H
#define EMX_TOOLS_B64_H

#include <stddef.h>
#include <stdint.h>

/* Characters b64_encode writes for n bytes (no NUL). */
static inline size_t b64_encoded_len(size_t n)
{
    return (n + 2) / 3 * 4;
}
/* Largest number of bytes b64_decode can write for n characters. */
static inline size_t b64_decoded_max(size_t n)
{
    return n / 4 * 3;
}

/* Encode n bytes into out (b64_encoded_len(n) bytes); returns that length. */
size_t b64_encode(const uint8_t *in, size_t n, char *out);
/* Decode n characters into out (room for b64_decoded_max(n) bytes).
 * Returns the number of bytes, or -1 if the text is not strict base64. */
long b64_decode(const char *in, size_t n, uint8_t *out);
/* Bytes a valid text of n characters decodes to, from its padding only;
 * -1 if n is not a multiple of 4. */
long b64_decoded_len(const char *in, size_t n);

#endif
