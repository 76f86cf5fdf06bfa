/*
 * serial2tcp_local: LiteX Verilator sim module joining the SoC's UART stream to one TCP client.
 *
 * Differences from LiteX's serial2tcp (which binds 0.0.0.0 and drops UART output while no client
 * is connected):
 * - listens on 127.0.0.1 only; "port": 0 picks a free port;
 * - prints "[serial2tcp_local] listening on 127.0.0.1:PORT" (flushed) once bound, so that a
 *   launcher can read the port from the simulator's stdout;
 * - keeps UART output while no client is connected (up to "buffer" bytes, default 64 KiB), then
 *   applies back-pressure to the UART (tx_ready = 0) instead of dropping bytes;
 * - one client at a time: a second connection is closed at once; a client that disconnects
 *   leaves the port open for the next one;
 * - bounded input: at most "buffer" bytes are read from the socket ahead of the UART, after that
 *   TCP flow control holds the client back;
 * - optional pacing: "cycles_per_byte": N > 0 moves at most one byte per N sys_clk cycles in
 *   each direction (a real UART's rate, e.g. sys_clk / baudrate * 10), 0 = one byte per cycle.
 *
 * Args (sim_config.js): {"port": 0, "buffer": 65536, "cycles_per_byte": 0}
 */

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <json-c/json.h>

#include "error.h"
#include "modules.h"

#define NAME "serial2tcp_local"

struct session_s {
	/* UART pads: source = SoC -> host (tx), sink = host -> SoC (rx). */
	char *tx;
	char *tx_valid;
	char *tx_ready;
	char *rx;
	char *rx_valid;
	char *rx_ready;
	char *sys_clk;
	clk_edge_state_t edge;

	struct evconnlistener *listener;
	struct bufferevent *bev;   /* the connected client, or NULL */
	struct evbuffer *pending;  /* UART output while no client is connected */
	size_t buffer;             /* bound of each direction's buffer (bytes) */
	unsigned cycles_per_byte;  /* 0: no pacing */
	unsigned tx_wait;          /* cycles before the next byte may move */
	unsigned rx_wait;
	int port;
};

static struct event_base *base;

static int get_int_arg(json_object *args, const char *key, long long dflt, long long *out)
{
	json_object *v = NULL;

	if (!args || !json_object_object_get_ex(args, key, &v)) {
		*out = dflt;
		return RC_OK;
	}
	errno = 0;
	*out = json_object_get_int64(v);
	if (errno) {
		fprintf(stderr, "[" NAME "] argument \"%s\" is not an integer\n", key);
		return RC_JSERROR;
	}
	return RC_OK;
}

static int pads_get(struct pad_s *pads, const char *name, char **signal)
{
	int i;

	*signal = NULL;
	for (i = 0; pads[i].name; i++) {
		if (!strcmp(pads[i].name, name)) {
			*signal = (char *)pads[i].signal;
			return RC_OK;
		}
	}
	fprintf(stderr, "[" NAME "] pad %s not found\n", name);
	return RC_ERROR;
}

static int serial2tcp_local_start(void *b)
{
	base = (struct event_base *)b;
	/* A client that goes away must not kill the simulator with SIGPIPE. */
	signal(SIGPIPE, SIG_IGN);
	return RC_OK;
}

static void drop_client(struct session_s *s, const char *why)
{
	if (!s->bev)
		return;
	printf("[" NAME "] client disconnected (%s)\n", why);
	fflush(stdout);
	bufferevent_free(s->bev); /* closes the socket (BEV_OPT_CLOSE_ON_FREE) */
	s->bev = NULL;
}

static void event_cb(struct bufferevent *bev, short events, void *ctx)
{
	struct session_s *s = (struct session_s *)ctx;

	if (events & BEV_EVENT_EOF)
		drop_client(s, "EOF");
	else if (events & BEV_EVENT_ERROR)
		drop_client(s, evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
}

static void accept_cb(struct evconnlistener *listener, evutil_socket_t fd,
                      struct sockaddr *address, int socklen, void *ctx)
{
	struct session_s *s = (struct session_s *)ctx;
	struct bufferevent *bev;
	int one = 1;

	if (s->bev) {
		/* One client at a time: two hosts interleaving frames would confuse both. */
		printf("[" NAME "] refused a second client\n");
		fflush(stdout);
		evutil_closesocket(fd);
		return;
	}
	/* The UART trickles bytes out: without TCP_NODELAY, Nagle + delayed ACKs cost ~40 ms. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	bev = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (!bev) {
		evutil_closesocket(fd);
		return;
	}
	/* Stop reading from the socket once `buffer` bytes wait for the UART (TCP flow control). */
	bufferevent_setwatermark(bev, EV_READ, 0, s->buffer);
	bufferevent_setcb(bev, NULL, NULL, event_cb, s);
	bufferevent_enable(bev, EV_READ | EV_WRITE);
	/* Deliver what the SoC printed while nobody was listening (boot banner). */
	bufferevent_write_buffer(bev, s->pending);
	s->bev = bev;
	printf("[" NAME "] client connected\n");
	fflush(stdout);
}

static void accept_error_cb(struct evconnlistener *listener, void *ctx)
{
	int err = EVUTIL_SOCKET_ERROR();

	/* Transient (e.g. EMFILE): report and keep listening. */
	fprintf(stderr, "[" NAME "] accept error: %s\n", evutil_socket_error_to_string(err));
}

static int serial2tcp_local_new(void **sess, char *args)
{
	struct session_s *s = NULL;
	json_object *jargs = NULL;
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	long long port, buffer, cpb;
	int ret = RC_OK;

	if (!sess)
		return RC_INVARG;
	*sess = NULL;
	if (args) {
		jargs = json_tokener_parse(args);
		if (!jargs || !json_object_is_type(jargs, json_type_object)) {
			fprintf(stderr, "[" NAME "] cannot parse args: %s\n", args);
			ret = RC_JSERROR;
			goto out;
		}
	}
	if ((ret = get_int_arg(jargs, "port", 0, &port)) != RC_OK ||
	    (ret = get_int_arg(jargs, "buffer", 65536, &buffer)) != RC_OK ||
	    (ret = get_int_arg(jargs, "cycles_per_byte", 0, &cpb)) != RC_OK)
		goto out;
	if (port < 0 || port > 65535 || buffer < 1 || buffer > (1 << 24) || cpb < 0 || cpb > 1000000) {
		fprintf(stderr, "[" NAME "] bad args: port %lld, buffer %lld, cycles_per_byte %lld\n",
		        port, buffer, cpb);
		ret = RC_INVARG;
		goto out;
	}

	s = (struct session_s *)calloc(1, sizeof(*s));
	if (!s) {
		ret = RC_NOENMEM;
		goto out;
	}
	s->buffer = (size_t)buffer;
	s->cycles_per_byte = (unsigned)cpb;
	s->pending = evbuffer_new();
	if (!s->pending) {
		ret = RC_NOENMEM;
		goto out;
	}

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* 127.0.0.1 only, never 0.0.0.0 */
	sin.sin_port = htons((unsigned short)port);
	s->listener = evconnlistener_new_bind(base, accept_cb, s,
	                                      LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC,
	                                      -1, (struct sockaddr *)&sin, sizeof(sin));
	if (!s->listener) {
		fprintf(stderr, "[" NAME "] cannot listen on 127.0.0.1:%lld: %s\n", port, strerror(errno));
		ret = RC_ERROR;
		goto out;
	}
	evconnlistener_set_error_cb(s->listener, accept_error_cb);
	if (getsockname(evconnlistener_get_fd(s->listener), (struct sockaddr *)&sin, &len) != 0) {
		ret = RC_ERROR;
		goto out;
	}
	s->port = ntohs(sin.sin_port);
	printf("[" NAME "] listening on 127.0.0.1:%d\n", s->port);
	fflush(stdout);

out:
	if (jargs)
		json_object_put(jargs);
	if (ret != RC_OK && s) {
		if (s->listener)
			evconnlistener_free(s->listener);
		if (s->pending)
			evbuffer_free(s->pending);
		free(s);
		s = NULL;
	}
	*sess = (void *)s;
	return ret;
}

static int serial2tcp_local_add_pads(void *sess, struct pad_list_s *plist)
{
	struct session_s *s = (struct session_s *)sess;
	struct pad_s *pads;
	int ret = RC_OK;

	if (!sess || !plist)
		return RC_INVARG;
	pads = plist->pads;
	if (!strcmp(plist->name, "serial")) {
		ret |= pads_get(pads, "source_data", &s->tx);
		ret |= pads_get(pads, "source_valid", &s->tx_valid);
		ret |= pads_get(pads, "source_ready", &s->tx_ready);
		ret |= pads_get(pads, "sink_data", &s->rx);
		ret |= pads_get(pads, "sink_valid", &s->rx_valid);
		ret |= pads_get(pads, "sink_ready", &s->rx_ready);
	}
	if (!strcmp(plist->name, "sys_clk"))
		ret |= pads_get(pads, "sys_clk", &s->sys_clk);
	return ret ? RC_ERROR : RC_OK;
}

/*
 * Called after each evaluation. At a rising edge the outputs of the SoC are those after the edge;
 * what we drive now is sampled at the next rising edge. So a byte shown with valid & ready now
 * is transferred at the next edge: we count it as moved now.
 */
static int serial2tcp_local_tick(void *sess, uint64_t time_ps)
{
	struct session_s *s = (struct session_s *)sess;
	struct evbuffer *out, *in;
	unsigned char c;

	if (!s->sys_clk || !s->tx || !s->rx || !clk_pos_edge(&s->edge, *s->sys_clk))
		return RC_OK;

	/* SoC -> host. */
	out = s->bev ? bufferevent_get_output(s->bev) : s->pending;
	if (s->tx_wait) {
		s->tx_wait--;
		*s->tx_ready = 0;
	} else {
		*s->tx_ready = evbuffer_get_length(out) < s->buffer;
		if (*s->tx_ready && *s->tx_valid) {
			c = (unsigned char)*s->tx;
			evbuffer_add(out, &c, 1);
			s->tx_wait = s->cycles_per_byte ? s->cycles_per_byte - 1 : 0;
		}
	}

	/* Host -> SoC. */
	*s->rx_valid = 0;
	if (s->rx_wait) {
		s->rx_wait--;
	} else if (s->bev) {
		in = bufferevent_get_input(s->bev);
		if (evbuffer_get_length(in) && evbuffer_copyout(in, &c, 1) == 1) {
			*s->rx = (char)c;
			*s->rx_valid = 1;
			if (*s->rx_ready) {
				evbuffer_drain(in, 1);
				s->rx_wait = s->cycles_per_byte ? s->cycles_per_byte - 1 : 0;
			}
		}
	}
	return RC_OK;
}

static int serial2tcp_local_close(void *sess)
{
	struct session_s *s = (struct session_s *)sess;

	if (!s)
		return RC_OK;
	drop_client(s, "simulation ends");
	if (s->listener)
		evconnlistener_free(s->listener);
	if (s->pending)
		evbuffer_free(s->pending);
	free(s);
	return RC_OK;
}

static struct ext_module_s ext_mod = {
	NAME,
	serial2tcp_local_start,
	serial2tcp_local_new,
	serial2tcp_local_add_pads,
	serial2tcp_local_close,
	serial2tcp_local_tick
};

int litex_sim_ext_module_init(int (*register_module)(struct ext_module_s *))
{
	return register_module(&ext_mod);
}
