/* bakedllama firmware: the protocol's commands over the accelerator (PROTOCOL.md).
 *
 * One loop, no interrupts: read the link byte by byte into the frame decoder, answer each frame.
 * Every wait (UART transmit, accelerator) keeps reading the link, so nothing overflows while the
 * firmware works, and every wait on the accelerator is bounded by a watchdog. */
#include "app.h"
#include "hw.h"
#include "proto.h"

#define FW_MAJOR 2
#define FW_MINOR 0
#define STR_(x) #x
#define STR(x) STR_(x)
#define MAX_SEQ_LEN 1024                       /* prompt buffer, tokens */
#define ACCEL_TIMEOUT_CYCLES (1u << 26)         /* one forward pass; ~2.7 s at 25 MHz */

static struct rx_state rx;
static int rx_pending;                          /* rx holds a finished frame not handled yet */
static enum rx_result rx_result;
static uint8_t tx[PROTO_MAX_FRAME];
static uint16_t prompt[MAX_SEQ_LEN];
static uint16_t prompt_len;
static struct model_cfg cfg;
static uint32_t max_prompt;                     /* min(seq_len, MAX_SEQ_LEN) */
static int logits_valid;                        /* a pass ran since the last reset (LOGITS) */

static struct {
	uint32_t frames_ok, frames_bad, frames_too_long, errors_sent, generations, hw_timeouts;
} counters;

static struct {
	uint16_t prompt_tokens, generated;
	uint32_t min_cycles, max_cycles;
	uint64_t prefill_cycles, decode_cycles, wall_cycles;
} last;

/* Link --------------------------------------------------------------------------------------- */

/* Read the UART until a frame is complete; that frame waits in rx until released. */
static void rx_service(void)
{
	enum rx_result r;

	while (!rx_pending && hw_uart_readable()) {
		r = rx_byte(&rx, hw_uart_read());
		if (r != RX_NONE) {
			rx_result = r;
			rx_pending = 1;
		}
	}
}

static void put_byte(uint8_t c, void *ctx)
{
	(void)ctx;
	while (!hw_uart_writable())
		rx_service();
	hw_uart_write(c);
}

/* Send tx's payload (already at tx + PROTO_HEADER, n bytes) as a frame. */
static uint8_t reply_version = PROTO_VERSION;

static void send(uint8_t type, uint8_t seq, size_t n)
{
	cobs_write(tx, frame_build_v(tx, reply_version, type, seq, tx + PROTO_HEADER, n), put_byte, 0);
}

static void send_error(uint8_t seq, uint8_t code, uint8_t type, uint16_t detail)
{
	uint8_t *p = tx + PROTO_HEADER;

	p[0] = code;
	p[1] = type;
	put_u16(p + 2, detail);
	send(T_ERROR, seq, 4);
	counters.errors_sent++;
}

/* Answer a frame that did not decode (bad CRC, COBS, too long) or has the wrong version.
 * Returns 1 if the frame was such a frame (and is answered), 0 if it is a valid request. */
static int reject_bad_frame(void)
{
	uint8_t seq = rx.len >= 3 ? rx.buf[2] : 0;
	uint8_t type = rx.len >= 2 ? rx.buf[1] : 0;

	switch (rx_result) {
	case RX_FRAME:
		if (rx.buf[0] == PROTO_VERSION) {
			counters.frames_ok++;
			return 0;
		}
		counters.frames_bad++;
		reply_version = rx.buf[0] == 1 ? 1 : PROTO_VERSION;  /* a v1 host can read this one */
		send_error(seq, E_BAD_VERSION, type, PROTO_VERSION);
		reply_version = PROTO_VERSION;
		return 1;
	case RX_BAD_CRC:
		counters.frames_bad++;
		send_error(seq, E_BAD_CRC, type, (uint16_t)rx.len);
		return 1;
	case RX_TOO_LONG:
		counters.frames_too_long++;
		send_error(0, E_TOO_LONG, 0, 0);
		return 1;
	default:
		counters.frames_bad++;
		send_error(seq, E_BAD_FRAME, type, (uint16_t)rx.len);
		return 1;
	}
}

/* Accelerator ---------------------------------------------------------------------------------- */

enum wait_result { WAIT_OK, WAIT_ABORT, WAIT_TIMEOUT };

/* During a generation: handle one pending frame. Returns 1 for ABORT (its seq in *abort_seq). */
static int poll_during_generation(uint8_t *abort_seq)
{
	uint8_t type;

	rx_service();
	if (!rx_pending)
		return 0;
	if (!reject_bad_frame()) {
		type = rx.buf[1];
		if (type == T_ABORT && rx.len == PROTO_MIN_FRAME) {
			*abort_seq = rx.buf[2];
			rx_pending = 0;
			return 1;
		}
		send_error(rx.buf[2], E_BUSY, type, 0);
	}
	rx_pending = 0;
	return 0;
}

/* Requests ------------------------------------------------------------------------------------- */

static void do_info(uint8_t seq)
{
	uint8_t *p = tx + PROTO_HEADER;

	p[0] = PROTO_VERSION;
	p[1] = FW_MAJOR;
	p[2] = FW_MINOR;
	p[3] = hw_testing_core() ? 1 : 0;
	put_u32(p + 4, hw_model_id());
	put_u32(p + 8, cfg.dim);
	put_u32(p + 12, cfg.n_layers);
	put_u32(p + 16, cfg.n_heads);
	put_u32(p + 20, cfg.n_kv_heads);
	put_u32(p + 24, cfg.hidden_dim);
	put_u32(p + 28, cfg.vocab_size);
	put_u32(p + 32, cfg.seq_len);
	put_u32(p + 36, cfg.lanes);
	put_u32(p + 40, hw_sys_clk_freq());
	put_u16(p + 44, PROTO_MAX_PAYLOAD);
	p[46] = hw_board();
	p[47] = 0;
	send(T_INFO | T_REPLY, seq, INFO_SIZE);
}

static void do_stats(uint8_t seq)
{
	uint8_t *p = tx + PROTO_HEADER;

	put_u32(p + 0, counters.frames_ok);
	put_u32(p + 4, counters.frames_bad);
	put_u32(p + 8, counters.frames_too_long);
	put_u32(p + 12, counters.errors_sent);
	put_u32(p + 16, counters.generations);
	put_u32(p + 20, counters.hw_timeouts);
	put_u16(p + 24, last.prompt_tokens);
	put_u16(p + 26, last.generated);
	put_u32(p + 28, last.min_cycles);
	put_u32(p + 32, last.max_cycles);
	put_u32(p + 36, 0);
	put_u64(p + 40, last.prefill_cycles);
	put_u64(p + 48, last.decode_cycles);
	put_u64(p + 56, last.wall_cycles);
	send(T_STATS | T_REPLY, seq, STATS_SIZE);
}

static void accel_reset(uint32_t seed)
{
	hw_loop_stop();
	hw_accel_set_temperature(0);
	hw_accel_reset(seed);
	while (hw_accel_out_valid())                /* nothing of an earlier request stays queued */
		hw_accel_take();
	logits_valid = 0;
}

static void do_reset(uint8_t seq, uint32_t seed)
{
	accel_reset(seed);
	prompt_len = 0;
	send(T_RESET | T_REPLY, seq, 0);
}

static void do_prompt(uint8_t seq, const uint8_t *p, size_t n)
{
	uint32_t offset, k, i;

	if (n < 2 || (n & 1)) {
		send_error(seq, E_BAD_LENGTH, T_PROMPT, (uint16_t)n);
		return;
	}
	offset = get_u16(p);
	k = (n - 2) / 2;
	if (offset > prompt_len || offset + k > max_prompt) {
		send_error(seq, E_OUT_OF_RANGE, T_PROMPT, 0xFFFF);
		return;
	}
	for (i = 0; i < k; i++) {
		if (get_u16(p + 2 + 2 * i) >= cfg.vocab_size) {
			send_error(seq, E_OUT_OF_RANGE, T_PROMPT, (uint16_t)i);
			return;
		}
	}
	for (i = 0; i < k; i++)
		prompt[offset + i] = get_u16(p + 2 + 2 * i);
	prompt_len = (uint16_t)(offset + k);
	put_u16(tx + PROTO_HEADER, prompt_len);
	send(T_PROMPT | T_REPLY, seq, 2);
}

static void send_done(uint8_t seq, uint8_t reason)
{
	uint8_t *p = tx + PROTO_HEADER;

	put_u16(p, last.prompt_tokens);
	put_u16(p + 2, last.generated);
	p[4] = reason;
	p[5] = 0;
	put_u64(p + 6, last.prefill_cycles);
	put_u64(p + 14, last.decode_cycles);
	put_u64(p + 22, last.wall_cycles);
	send(T_GENERATE | T_REPLY, seq, DONE_SIZE);
}

/* Wait for the running pass, reading the link meanwhile (an ABORT lets the pass finish first:
 * *aborting is set and its seq kept). Returns 0 on an accelerator timeout (counted; the
 * accelerator is reset and the caller reports it). */
static int wait_pass(int *aborting, uint8_t *abort_seq)
{
	uint32_t t = hw_cycles_now();

	while (!hw_accel_out_valid()) {
		if (!*aborting && poll_during_generation(abort_seq))
			*aborting = 1;
		if ((uint32_t)(hw_cycles_now() - t) > ACCEL_TIMEOUT_CYCLES)
			break;
	}
	if (hw_accel_out_valid()) {
		logits_valid = 1;
		return 1;
	}
	counters.hw_timeouts++;
	accel_reset(0);
	return 0;
}

static void count_pass(uint32_t cycles, int prefill)
{
	if (prefill)
		last.prefill_cycles += cycles;
	else
		last.decode_cycles += cycles;
	if (cycles < last.min_cycles)
		last.min_cycles = cycles;
	if (cycles > last.max_cycles)
		last.max_cycles = cycles;
}

/* TOKENS: u16 index of the batch's first generated token, u8 n, u8 0, u32 cycles (the passes that
 * made them), u16 tokens[n]. */
static uint16_t batch[TOKENS_BATCH];

static void send_tokens(uint8_t seq, uint32_t first, uint32_t n, uint32_t cycles)
{
	uint8_t *p = tx + PROTO_HEADER;
	uint32_t i;

	put_u16(p, (uint16_t)first);
	p[2] = (uint8_t)n;
	p[3] = 0;
	put_u32(p + 4, cycles);
	for (i = 0; i < n; i++)
		put_u16(p + TOKENS_HEAD + 2 * i, batch[i]);
	send(T_TOKENS, seq, TOKENS_HEAD + 2 * n);
}

/* golden.generate on the accelerator: the prompt passes but the last are fed by the CPU, greedy
 * (the sampler's generator does not advance); the last prompt token starts the hardware loop
 * (LlamaPort) at the requested temperature: the accelerator feeds each token back itself, and
 * the CPU only drains its FIFO into TOKENS frames of up to TOKENS_BATCH tokens (a batch also goes
 * out when its first token has waited FLUSH_US). ABORT stops the loop; the pass in flight lands
 * in the last batch. */
static void generate(uint8_t seq, uint16_t max_tokens, uint16_t inv_t, uint32_t seed)
{
	uint32_t n = prompt_len, pos, c, t, t0, t_tok, t_batch = 0, nb = 0, first = 0, bcyc = 0;
	uint32_t flush = hw_sys_clk_freq() / 1000000u * FLUSH_US;
	uint8_t reason = DONE_COMPLETE, abort_seq = 0;
	int aborting = 0, stopped = 0;

	counters.generations++;
	last.prompt_tokens = (uint16_t)n;
	last.generated = 0;
	last.min_cycles = 0xFFFFFFFFu;
	last.max_cycles = 0;
	last.prefill_cycles = last.decode_cycles = last.wall_cycles = 0;
	t0 = hw_cycles_now();
	accel_reset(seed);

	for (pos = 0; pos + 1 < n; pos++) {
		hw_accel_feed(prompt[pos]);
		if (!wait_pass(&aborting, &abort_seq)) {
			send_error(seq, E_HW_TIMEOUT, T_GENERATE, (uint16_t)pos);
			reason = DONE_HW_TIMEOUT;
			goto done;
		}
		count_pass(hw_accel_cycles(), 1);
		hw_accel_take();
		if (aborting) {
			reason = DONE_ABORTED;
			goto done;
		}
	}
	hw_accel_set_temperature(inv_t);
	hw_loop_start((uint16_t)(max_tokens - 1));
	hw_accel_feed(prompt[n - 1]);
	t_tok = hw_cycles_now();
	while (last.generated < max_tokens) {
		t = hw_cycles_now();
		if (hw_accel_out_valid()) {
			c = hw_accel_cycles();
			if (nb == 0) {
				first = last.generated;
				bcyc = 0;
				t_batch = t;
			}
			batch[nb++] = hw_accel_take();
			count_pass(c, last.generated == 0);  /* the first token's pass is the last prompt pass */
			bcyc += c;
			last.generated++;
			logits_valid = 1;
			t_tok = t;
		} else {
			/* aborted: nothing runs (read first) and nothing landed since: all is out */
			if (stopped && !hw_accel_in_flight() && !hw_accel_out_valid())
				break;
			if (!aborting && poll_during_generation(&abort_seq)) {
				aborting = 1;
				hw_loop_stop();
				stopped = 1;
			}
			if ((uint32_t)(t - t_tok) > ACCEL_TIMEOUT_CYCLES) {
				counters.hw_timeouts++;
				hw_loop_stop();
				accel_reset(0);
				if (nb)
					send_tokens(seq, first, nb, bcyc);
				send_error(seq, E_HW_TIMEOUT, T_GENERATE, (uint16_t)(n - 1 + last.generated));
				reason = DONE_HW_TIMEOUT;
				goto done;
			}
		}
		if (nb && (nb == TOKENS_BATCH || last.generated == max_tokens ||
		           (!hw_accel_out_valid() && (uint32_t)(t - t_batch) >= flush))) {
			send_tokens(seq, first, nb, bcyc);
			nb = 0;
		}
	}
	if (nb)
		send_tokens(seq, first, nb, bcyc);
	if (aborting)
		reason = DONE_ABORTED;
done:
	hw_loop_stop();
	if (last.min_cycles == 0xFFFFFFFFu)
		last.min_cycles = 0;
	last.wall_cycles = hw_cycles_now() - t0;
	send_done(seq, reason);
	if (aborting) {
		tx[PROTO_HEADER] = 1;
		send(T_ABORT | T_REPLY, abort_seq, 1);
	}
}

static void do_generate(uint8_t seq, const uint8_t *p, size_t n)
{
	uint16_t max_tokens, inv_t;
	uint32_t seed;

	if (n != 8) {
		send_error(seq, E_BAD_LENGTH, T_GENERATE, (uint16_t)n);
		rx_pending = 0;
		return;
	}
	max_tokens = get_u16(p);
	inv_t = get_u16(p + 2);
	seed = get_u32(p + 4);
	rx_pending = 0;                             /* p is not used past here */
	if (prompt_len == 0) {
		send_error(seq, E_BAD_STATE, T_GENERATE, 0);
		return;
	}
	if (max_tokens == 0 || (uint32_t)prompt_len + max_tokens > cfg.seq_len) {
		send_error(seq, E_OUT_OF_RANGE, T_GENERATE, max_tokens);
		return;
	}
	generate(seq, max_tokens, inv_t, seed);
}

/* DRAFT / DRAFT_SAMPLED: rewind the accelerator to `pos` (at most its current position: the KV
 * cache holds positions 0 .. pos - 1 of this sequence), feed the m context tokens, then draft k
 * tokens, feeding each back but the last. DRAFT drafts greedy; DRAFT_SAMPLED at 1/T = inv_t
 * (the context passes before the last stay greedy, so the sampler's generator advances once per
 * draft) and reports each draft's draw (base, weight, total: numerics.draw_count).
 * Request: u16 pos, u16 k, [u16 inv_t,] u16 tokens[m]. Reply: u16 position after, u16 drafts,
 * u32 cycles (hardware counter, all passes), u32 wall cycles (firmware timer), then per draft its
 * u16 token [and u32 base, u32 weight, u32 total]. */
static uint16_t draft_in[PROTO_MAX_PAYLOAD / 2];

static void do_draft(uint8_t seq, uint8_t type, const uint8_t *p, size_t n)
{
	uint32_t pos, k, m, i, passes, made = 0, cycles = 0, t0, head, item, base, weight, total;
	uint16_t tok, out = 0, inv_t = 0;
	uint8_t *r = tx + PROTO_HEADER, *d, abort_seq = 0;
	int aborting = 0, sampled = type == T_DRAFT_SAMPLED;

	head = sampled ? 6 : 4;
	item = sampled ? DRAFT_SAMPLED_ITEM : 2;
	if (n < head + 2 || (n & 1)) {
		send_error(seq, E_BAD_LENGTH, type, (uint16_t)n);
		rx_pending = 0;
		return;
	}
	pos = get_u16(p);
	k = get_u16(p + 2);
	if (sampled)
		inv_t = get_u16(p + 4);
	m = (uint32_t)(n - head) / 2;
	if (sampled && (!hw_accel_has_draws() || inv_t == 0)) {
		send_error(seq, E_BAD_STATE, type, inv_t == 0 ? 0 : 1);
		rx_pending = 0;
		return;
	}
	if (pos > hw_accel_pos()) {
		send_error(seq, E_OUT_OF_RANGE, type, 0xFFFF);
		rx_pending = 0;
		return;
	}
	if (k == 0 || DRAFT_HEAD + item * k > PROTO_MAX_PAYLOAD || pos + m + k - 1 > cfg.seq_len) {
		send_error(seq, E_OUT_OF_RANGE, type, 0xFFFE);
		rx_pending = 0;
		return;
	}
	for (i = 0; i < m; i++) {
		draft_in[i] = get_u16(p + head + 2 * i);
		if (draft_in[i] >= cfg.vocab_size) {
			send_error(seq, E_OUT_OF_RANGE, type, (uint16_t)i);
			rx_pending = 0;
			return;
		}
	}
	rx_pending = 0;                             /* p is not used past here */
	t0 = hw_cycles_now();
	hw_accel_set_temperature(0);
	hw_accel_rewind(pos);
	passes = m + k - 1;
	for (i = 0; i < passes; i++) {
		tok = i < m ? draft_in[i] : out;
		if (i + 1 == m)                         /* the passes from the last context token on */
			hw_accel_set_temperature(inv_t);
		hw_accel_feed(tok);
		if (!wait_pass(&aborting, &abort_seq)) {
			send_error(seq, E_HW_TIMEOUT, type, (uint16_t)(pos + i));
			return;
		}
		cycles += hw_accel_cycles();
		out = hw_accel_take();
		if (i + 1 >= m) {
			d = r + DRAFT_HEAD + item * made++;
			put_u16(d, out);
			if (sampled) {
				hw_accel_draw(&base, &weight, &total);
				put_u32(d + 2, base);
				put_u32(d + 6, weight);
				put_u32(d + 10, total);
			}
		}
		if (aborting)
			break;
	}
	hw_accel_set_temperature(0);
	put_u16(r, (uint16_t)hw_accel_pos());
	put_u16(r + 2, (uint16_t)made);           /* fewer than k when aborted */
	put_u32(r + 4, cycles);
	put_u32(r + 8, hw_cycles_now() - t0);
	send(type | T_REPLY, seq, DRAFT_HEAD + item * made);
	if (aborting) {
		tx[PROTO_HEADER] = 1;
		send(T_ABORT | T_REPLY, abort_seq, 1);
	}
}

/* LOGITS: u16 start, u16 count -> u16 start, u16 count, i32 logits[count]: the Q8 logits of the
 * last forward pass (the sampler's input), for speculative sampling's residual distribution. */
static void do_logits(uint8_t seq, const uint8_t *p, size_t n)
{
	uint32_t start, count, i;
	uint8_t *r = tx + PROTO_HEADER;

	if (n != 4) {
		send_error(seq, E_BAD_LENGTH, T_LOGITS, (uint16_t)n);
		return;
	}
	start = get_u16(p);
	count = get_u16(p + 2);
	if (!hw_accel_has_draws() || !logits_valid) {
		send_error(seq, E_BAD_STATE, T_LOGITS, logits_valid ? 1 : 0);
		return;
	}
	if (count == 0 || 4 + 4 * count > PROTO_MAX_PAYLOAD || start + count > cfg.vocab_size) {
		send_error(seq, E_OUT_OF_RANGE, T_LOGITS, (uint16_t)count);
		return;
	}
	put_u16(r, (uint16_t)start);
	put_u16(r + 2, (uint16_t)count);
	for (i = 0; i < count; i++)
		put_u32(r + 4 + 4 * i, (uint32_t)hw_accel_logit(start + i));
	send(T_LOGITS | T_REPLY, seq, 4 + 4 * count);
}

static void handle_frame(void)
{
	uint8_t type, seq;
	const uint8_t *payload;
	size_t n;

	if (reject_bad_frame())
		return;
	type = rx.buf[1];
	seq = rx.buf[2];
	payload = rx.buf + PROTO_HEADER;
	n = rx.len - PROTO_MIN_FRAME;
	switch (type) {
	case T_RESET:                               /* optional u32 seed (DRAFT_SAMPLED's draws) */
		if (n != 0 && n != 4) {
			send_error(seq, E_BAD_LENGTH, type, (uint16_t)n);
			return;
		}
		do_reset(seq, n ? get_u32(payload) : 0);
		return;
	case T_INFO:
	case T_STATS:
	case T_ABORT:
		if (n) {
			send_error(seq, E_BAD_LENGTH, type, (uint16_t)n);
			return;
		}
		if (type == T_INFO)
			do_info(seq);
		else if (type == T_STATS)
			do_stats(seq);
		else {
			tx[PROTO_HEADER] = 0;               /* nothing was running */
			send(T_ABORT | T_REPLY, seq, 1);
		}
		return;
	case T_PROMPT:
		do_prompt(seq, payload, n);
		return;
	case T_GENERATE:
		do_generate(seq, payload, n);
		return;
	case T_DRAFT:
	case T_DRAFT_SAMPLED:
		do_draft(seq, type, payload, n);
		return;
	case T_LOGITS:
		do_logits(seq, payload, n);
		return;
	case T_ECHO: {
		size_t i;
		for (i = 0; i < n; i++)
			tx[PROTO_HEADER + i] = payload[i];
		send(T_ECHO | T_REPLY, seq, n);
		return;
	}
	default:
		send_error(seq, E_UNKNOWN_TYPE, type, 0);
		return;
	}
}

static void banner(void)
{
	static const char line[] = "bakedllama firmware " STR(FW_MAJOR) "." STR(FW_MINOR)
		" protocol " STR(PROTO_VERSION) " ready\r\n";
	const char *c;

	put_byte(0, 0);
	for (c = line; *c; c++)
		put_byte((uint8_t)*c, 0);
	put_byte(0, 0);
}

void app_init(void)
{
	rx_init(&rx);
	rx_pending = 0;
	prompt_len = 0;
	hw_model_cfg(&cfg);
	max_prompt = cfg.seq_len < MAX_SEQ_LEN ? cfg.seq_len : MAX_SEQ_LEN;
	accel_reset(0);
	banner();
}

void app_poll(void)
{
	rx_service();
	if (rx_pending) {
		handle_frame();
		rx_pending = 0;
	}
}
