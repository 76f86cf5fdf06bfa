/* hw.h for the native firmware build (tests only): the UART is one TCP client on 127.0.0.1, the
 * accelerator a model of the test stand-in core (soc/testing_core.py: next token from a table).
 *
 * fw_native --table FILE [--seq-len N] [--port P] [--model-id X] [--latency N] [--clk HZ]
 *           [--stall-at POS]
 * FILE holds the table as little-endian u16 (its length is the vocabulary, a power of two).
 * --stall-at POS: the accelerator never answers at position POS (tests the firmware watchdog).
 * Logit readback and draws (speculative sampling) follow fixed formulas of the last pass, so
 * the tests can check what the firmware reports: logit i = (i * 7 + token + pos) % 61 - 30 for
 * that pass's input token and position; the draw is base = its output token, weight = pos + 1,
 * total = the vocabulary size + pos. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "hw.h"

#define PENDING_MAX 65536

static struct {
	uint16_t *table;
	uint32_t vocab, seq_len, model_id, latency, clk, port;
	long stall_at;
} opt = { NULL, 0, 256, 0x7E57C0DE, 64, 50000000, 0, -1 };

static int listen_fd = -1, client = -1;
static uint8_t inbuf[4096];
static size_t in_len, in_pos;
static uint8_t outbuf[PENDING_MAX];
static size_t out_len;
static unsigned idle;

/* Fake accelerator state. */
static uint32_t pos, prng, seed_csr;
static uint16_t inv_t, out_token, last_in;
static uint32_t last_pos;

int hw_native_args(int argc, char **argv);

int hw_native_args(int argc, char **argv)
{
	const char *table = NULL;
	FILE *f;
	long n;
	int i;

	for (i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--table"))
			table = argv[i + 1];
		else if (!strcmp(argv[i], "--seq-len"))
			opt.seq_len = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--port"))
			opt.port = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--model-id"))
			opt.model_id = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--latency"))
			opt.latency = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--clk"))
			opt.clk = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--stall-at"))
			opt.stall_at = strtol(argv[i + 1], NULL, 0);
		else {
			fprintf(stderr, "fw_native: unknown option %s\n", argv[i]);
			return 1;
		}
	}
	if (!table || !(f = fopen(table, "rb"))) {
		fprintf(stderr, "fw_native: --table FILE is required and readable\n");
		return 1;
	}
	fseek(f, 0, SEEK_END);
	n = ftell(f) / 2;
	fseek(f, 0, SEEK_SET);
	opt.table = malloc(n * 2);
	if (n < 2 || (n & (n - 1)) || fread(opt.table, 2, n, f) != (size_t)n) {
		fprintf(stderr, "fw_native: the table must hold a power of two of u16\n");
		return 1;
	}
	fclose(f);
	opt.vocab = (uint32_t)n;
	return 0;
}

void hw_init(void)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	int one = 1;

	listen_fd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons(opt.port);
	if (bind(listen_fd, (struct sockaddr *)&sin, sizeof(sin)) || listen(listen_fd, 1)) {
		perror("fw_native: bind");
		exit(1);
	}
	fcntl(listen_fd, F_SETFL, O_NONBLOCK);
	getsockname(listen_fd, (struct sockaddr *)&sin, &len);
	printf("[fw_native] listening on 127.0.0.1:%d\n", ntohs(sin.sin_port));
	fflush(stdout);
}

static void drop_client(void)
{
	close(client);
	client = -1;
	in_len = in_pos = 0;
}

static void flush_out(void)
{
	size_t done = 0;
	ssize_t w;

	if (client < 0)
		return;                                 /* kept until a client connects */
	while (done < out_len) {
		w = send(client, outbuf + done, out_len - done, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			drop_client();
			break;
		}
		done += w;
	}
	out_len = 0;
}

static void try_accept(int timeout_ms)
{
	struct pollfd p = { listen_fd, POLLIN, 0 };
	int one = 1;

	if (poll(&p, 1, timeout_ms) <= 0)
		return;
	client = accept(listen_fd, NULL, NULL);
	if (client >= 0) {
		setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		flush_out();
	}
}

int hw_uart_readable(void)
{
	struct pollfd p;
	ssize_t r;
	int timeout;

	if (in_pos < in_len)
		return 1;
	flush_out();
	timeout = idle > 1000 ? 1 : 0;              /* do not spin while nobody talks */
	if (client < 0) {
		try_accept(timeout);
		idle++;
		return 0;
	}
	p.fd = client;
	p.events = POLLIN;
	p.revents = 0;
	if (poll(&p, 1, timeout) <= 0) {
		idle++;
		return 0;
	}
	r = recv(client, inbuf, sizeof(inbuf), 0);
	if (r <= 0) {
		drop_client();
		return 0;
	}
	idle = 0;
	in_len = (size_t)r;
	in_pos = 0;
	return 1;
}

uint8_t hw_uart_read(void)
{
	return in_pos < in_len ? inbuf[in_pos++] : 0;
}

int hw_uart_writable(void)
{
	if (out_len >= sizeof(outbuf))
		flush_out();
	return out_len < sizeof(outbuf);
}

void hw_uart_write(uint8_t c)
{
	outbuf[out_len++] = c;
}

uint32_t hw_cycles_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint32_t)((ts.tv_sec * 1000000000ull + ts.tv_nsec) * opt.clk / 1000000000ull);
}

static uint32_t xorshift32(uint32_t x)
{
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return x;
}

/* The port (soc/common.py LlamaPort): a FIFO of (token, cycles), the offered token, the loop. */
#define NFIFO 32
static uint16_t fifo_tok[NFIFO];
static uint32_t fifo_cyc[NFIFO];
static unsigned f_head, f_len;
static int in_pending;
static uint16_t in_token;
static uint32_t loop_left;

/* Run passes while a token is offered and the FIFO has room (an instant accelerator). */
static void run(void)
{
	uint32_t mask = opt.vocab - 1, out;

	while (in_pending && f_len < NFIFO) {
		if (pos >= opt.seq_len || (long)pos == opt.stall_at)
			return;                             /* not accepted / never answers */
		out = opt.table[(in_token + pos) & mask];
		if (inv_t) {
			prng = xorshift32(prng);
			out = (out + (prng >> 16) + inv_t) & mask;
		}
		out_token = (uint16_t)out;
		last_in = in_token;
		last_pos = pos;
		fifo_tok[(f_head + f_len) % NFIFO] = (uint16_t)out;
		fifo_cyc[(f_head + f_len) % NFIFO] = opt.latency + pos;
		f_len++;
		pos++;
		if (loop_left) {
			loop_left--;
			in_token = (uint16_t)out;
		} else {
			in_pending = 0;
		}
	}
}

void hw_accel_reset(uint32_t seed)
{
	seed_csr = seed;
	pos = 0;
	prng = seed * 2654435761u + 0x6D2B79F5u;
	if (!prng)
		prng = 0x9E3779B9u;
	f_len = 0;
	in_pending = 0;
	loop_left = 0;
}

void hw_accel_rewind(uint32_t p)
{
	if (p <= pos)
		pos = p;
}

void hw_accel_set_temperature(uint16_t v)
{
	inv_t = v;
}

void hw_accel_feed(uint16_t token)
{
	in_pending = 1;
	in_token = token;
	run();
}

int hw_accel_out_valid(void)
{
	return f_len > 0;
}

uint16_t hw_accel_take(void)
{
	uint16_t t = fifo_tok[f_head];

	if (f_len) {
		f_head = (f_head + 1) % NFIFO;
		f_len--;
		run();
	}
	return t;
}

uint32_t hw_accel_cycles(void)
{
	return fifo_cyc[f_head];
}

void hw_loop_start(uint16_t n)
{
	loop_left = n;
}

void hw_loop_stop(void)
{
	loop_left = 0;
}

int hw_accel_in_flight(void)
{
	return in_pending;
}

uint32_t hw_accel_pos(void)
{
	return pos;
}

int hw_accel_has_draws(void)
{
	return 1;
}

int32_t hw_accel_logit(uint32_t i)
{
	return (int32_t)((i * 7 + last_in + last_pos) % 61) - 30;
}

void hw_accel_draw(uint32_t *base, uint32_t *weight, uint32_t *total)
{
	*base = out_token;
	*weight = last_pos + 1;
	*total = opt.vocab + last_pos;
}

uint32_t hw_model_id(void)
{
	return opt.model_id;
}

void hw_model_cfg(struct model_cfg *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->vocab_size = opt.vocab;
	cfg->seq_len = opt.seq_len;
}

uint32_t hw_sys_clk_freq(void)
{
	return opt.clk;
}

uint8_t hw_board(void)
{
	return 0;
}

int hw_testing_core(void)
{
	return 1;
}
