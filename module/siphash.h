/* SipHash (Aumasson and Bernstein), a keyed hash for tables whose keys a
 * peer chooses (requestIds, Thing names): without the key, collisions
 * cannot be computed in advance. */
#ifndef EMX_SIPHASH_H
#define EMX_SIPHASH_H

#include <stddef.h>
#include <stdint.h>

#define EMX_SIPHASH_KEY_SIZE 16

/* SipHash-c-d of `len` bytes under a 16-byte key. */
uint64_t emx_siphash(const uint8_t key[EMX_SIPHASH_KEY_SIZE], unsigned c_rounds, unsigned d_rounds,
                     const void *data, size_t len);

/* SipHash-1-3: fast enough for every table lookup and still keyed. */
static inline uint64_t emx_siphash13(const uint8_t key[EMX_SIPHASH_KEY_SIZE], const void *data,
                                     size_t len)
{
    return emx_siphash(key, 1, 3, data, len);
}

/* Fill a key from the kernel's random source; -errno when it cannot. */
int emx_siphash_random_key(uint8_t key[EMX_SIPHASH_KEY_SIZE]);

#endif
