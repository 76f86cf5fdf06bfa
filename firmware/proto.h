/* bakedllama serial protocol v2: constants, COBS + CRC-32 framing (see PROTOCOL.md).
 * Pure C, no hardware access: the same file builds for the SoC and natively for the tests. */
#ifndef BAKEDLLAMA_PROTO_H
#define BAKEDLLAMA_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION      2
#define PROTO_HEADER       3                    /* version, type, seq */
#define PROTO_CRC          4
#define PROTO_MAX_PAYLOAD  1024
#define PROTO_MIN_FRAME    (PROTO_HEADER + PROTO_CRC)
#define PROTO_MAX_FRAME    (PROTO_HEADER + PROTO_MAX_PAYLOAD + PROTO_CRC)
#define PROTO_CRC_RESIDUE  0x2144DF1Cu          /* CRC-32 of a frame followed by its CRC */

/* Requests (host -> device). */
#define T_INFO      0x01
#define T_RESET     0x02
#define T_PROMPT    0x03
#define T_GENERATE  0x04
#define T_STATS     0x05
#define T_ABORT     0x06
#define T_ECHO      0x07
#define T_DRAFT     0x08                        /* speculative decoding: rewind, feed, draft */
#define T_DRAFT_SAMPLED 0x09                    /* the same, sampled, with each draft's draw */
#define T_LOGITS    0x0A                        /* the last pass's Q8 logits */
/* Replies: request | 0x80; streamed and error frames. */
#define T_REPLY     0x80
#define T_TOKENS    0x45                        /* v2: a batch of generated tokens */
#define T_ERROR     0xFF

/* Error codes (ERROR payload: u8 code, u8 request type, u16 detail). */
#define E_BAD_CRC       1
#define E_BAD_FRAME     2
#define E_TOO_LONG      3
#define E_BAD_VERSION   4
#define E_UNKNOWN_TYPE  5
#define E_BAD_LENGTH    6
#define E_OUT_OF_RANGE  7
#define E_BAD_STATE     8
#define E_BUSY          9
#define E_HW_TIMEOUT    10

/* DONE reasons. */
#define DONE_COMPLETE   0
#define DONE_ABORTED    1
#define DONE_HW_TIMEOUT 2

/* TOKENS batches: at most TOKENS_BATCH tokens; a batch is sent once its first token waited
 * FLUSH_US microseconds (of the system clock). */
#define TOKENS_BATCH    32
#define TOKENS_HEAD     8                       /* u16 first, u8 n, u8 0, u32 cycles */
#define FLUSH_US        1000

/* Payload sizes. */
#define INFO_SIZE   48
#define STATS_SIZE  64
#define DONE_SIZE   30
#define DRAFT_HEAD  12                          /* DRAFT reply before its u16 tokens */
#define DRAFT_SAMPLED_ITEM 14                   /* u16 token, u32 base, weight, total */

uint32_t crc32_update(uint32_t crc, uint8_t byte);   /* crc starts at 0xFFFFFFFF */
uint32_t crc32(const uint8_t *data, size_t len);

/* Streaming receiver: feed bytes one by one; on a delimiter it reports what arrived. */
enum rx_result {
	RX_NONE = 0,      /* need more bytes (or an empty frame was skipped) */
	RX_FRAME,         /* a frame with a good CRC is in buf[0 .. len) (CRC included) */
	RX_BAD_CRC,
	RX_BAD_FRAME,     /* COBS error or shorter than PROTO_MIN_FRAME */
	RX_TOO_LONG,
};

struct rx_state {
	uint8_t buf[PROTO_MAX_FRAME];
	size_t len;          /* decoded bytes kept */
	size_t total;        /* decoded bytes seen (may exceed the buffer) */
	uint32_t crc;
	uint8_t remaining;   /* bytes left in the current COBS block; 0: a code byte is next */
	uint8_t zero_due;    /* the current block ends with an implied zero */
	uint8_t bad;         /* COBS violation seen in this frame */
	uint8_t started;     /* non-delimiter bytes seen since the last delimiter */
};

void rx_init(struct rx_state *s);
enum rx_result rx_byte(struct rx_state *s, uint8_t byte);

/* Frame builder: header + payload + CRC in buf; returns the decoded length. */
size_t frame_build(uint8_t *buf, uint8_t type, uint8_t seq, const uint8_t *payload, size_t n);
size_t frame_build_v(uint8_t *buf, uint8_t version, uint8_t type, uint8_t seq,
                     const uint8_t *payload, size_t n);
/* COBS-encode buf[0 .. len) through put(byte, ctx), then the 0x00 delimiter. */
void cobs_write(const uint8_t *buf, size_t len, void (*put)(uint8_t, void *), void *ctx);

/* Little-endian helpers. */
static inline void put_u16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static inline void put_u32(uint8_t *p, uint32_t v) { put_u16(p, v); put_u16(p + 2, v >> 16); }
static inline void put_u64(uint8_t *p, uint64_t v) { put_u32(p, (uint32_t)v); put_u32(p + 4, (uint32_t)(v >> 32)); }
static inline uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get_u32(const uint8_t *p) { return get_u16(p) | ((uint32_t)get_u16(p + 2) << 16); }

#endif
