/* bakedllama serial protocol v1: COBS framing and CRC-32 (see PROTOCOL.md). */
#include "proto.h"

/* CRC-32 (zlib), reflected, 4 bits at a time: a 64-byte table instead of 1 KiB. */
static const uint32_t crc_nibble[16] = {
	0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4, 0x4DB26158, 0x5005713C,
	0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C, 0x9B64C2B0, 0x86D3D2D4, 0xA00AE278, 0xBDBDF21C,
};

uint32_t crc32_update(uint32_t crc, uint8_t byte)
{
	crc = (crc >> 4) ^ crc_nibble[(crc ^ byte) & 0xF];
	crc = (crc >> 4) ^ crc_nibble[(crc ^ (byte >> 4)) & 0xF];
	return crc;
}

uint32_t crc32(const uint8_t *data, size_t len)
{
	uint32_t crc = 0xFFFFFFFFu;
	while (len--)
		crc = crc32_update(crc, *data++);
	return crc ^ 0xFFFFFFFFu;
}

void rx_init(struct rx_state *s)
{
	s->len = 0;
	s->total = 0;
	s->crc = 0xFFFFFFFFu;
	s->remaining = 0;
	s->zero_due = 0;
	s->bad = 0;
	s->started = 0;
}

static void rx_keep(struct rx_state *s, uint8_t b)
{
	if (s->total < PROTO_MAX_FRAME) {
		s->buf[s->len++] = b;
		s->crc = crc32_update(s->crc, b);
	}
	s->total++;
}

enum rx_result rx_byte(struct rx_state *s, uint8_t b)
{
	enum rx_result r;

	if (b == 0) {
		if (!s->started)
			return RX_NONE;                    /* empty frame: resynchronisation */
		if (s->total > PROTO_MAX_FRAME)
			r = RX_TOO_LONG;
		else if (s->bad || s->remaining || s->len < PROTO_MIN_FRAME)
			r = RX_BAD_FRAME;                  /* truncated COBS block or too short */
		else if ((s->crc ^ 0xFFFFFFFFu) != PROTO_CRC_RESIDUE)
			r = RX_BAD_CRC;
		else
			r = RX_FRAME;
		/* buf/len stay valid for the caller until the next non-zero byte. */
		s->started = 0;
		s->remaining = 0;
		s->zero_due = 0;
		s->bad = 0;
		return r;
	}
	if (!s->started) {
		rx_init(s);
		s->started = 1;
	}
	if (s->remaining == 0) {                   /* a COBS code byte */
		if (s->zero_due)
			rx_keep(s, 0);
		s->remaining = b - 1;
		s->zero_due = (b != 0xFF);
	} else {
		rx_keep(s, b);
		s->remaining--;
	}
	return RX_NONE;
}

size_t frame_build(uint8_t *buf, uint8_t type, uint8_t seq, const uint8_t *payload, size_t n)
{
	size_t i;

	if (payload && payload != buf + PROTO_HEADER) {
		/* Copy from the end: payload may overlap buf (it never lies after buf + 3). */
		for (i = n; i > 0; i--)
			buf[PROTO_HEADER + i - 1] = payload[i - 1];
	}
	buf[0] = PROTO_VERSION;
	buf[1] = type;
	buf[2] = seq;
	put_u32(buf + PROTO_HEADER + n, crc32(buf, PROTO_HEADER + n));
	return PROTO_HEADER + n + PROTO_CRC;
}

void cobs_write(const uint8_t *buf, size_t len, void (*put)(uint8_t, void *), void *ctx)
{
	size_t i = 0, j, k;
	uint8_t code;

	for (;;) {
		for (j = i; j < len && buf[j] != 0 && j - i < 254; j++)
			;
		code = (uint8_t)(j - i + 1);
		put(code, ctx);
		for (k = i; k < j; k++)
			put(buf[k], ctx);
		if (j == len)
			break;
		i = (code == 0xFF) ? j : j + 1;        /* a zero ends the block unless it was full */
	}
	put(0, ctx);
}
