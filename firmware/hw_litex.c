/* hw.h on a LiteX SoC: every address and bit position comes from the generated csr.h / soc.h. */
#include <generated/csr.h>
#include <generated/soc.h>

#include "hw.h"

#ifndef UART_EV_TX
#define UART_EV_TX 0x1
#define UART_EV_RX 0x2
#endif

#define BIT(name) (1u << (name))

void hw_init(void)
{
	/* UART polled: no interrupt, clear what is pending. */
	uart_ev_enable_write(0);
	uart_ev_pending_write(uart_ev_pending_read());
	/* timer0 as a free-running cycle counter (it counts down; hw_cycles_now inverts it). */
	timer0_en_write(0);
	timer0_reload_write(0xFFFFFFFFu);
	timer0_load_write(0xFFFFFFFFu);
	timer0_en_write(1);
}

int hw_uart_readable(void)
{
	return !uart_rxempty_read();
}

uint8_t hw_uart_read(void)
{
	uint8_t c = (uint8_t)uart_rxtx_read();

	uart_ev_pending_write(UART_EV_RX);         /* pops the RX FIFO */
	return c;
}

int hw_uart_writable(void)
{
	return !uart_txfull_read();
}

void hw_uart_write(uint8_t c)
{
	uart_rxtx_write(c);
}

uint32_t hw_cycles_now(void)
{
	timer0_update_value_write(1);
	return ~timer0_value_read();
}

void hw_accel_reset(uint32_t seed)
{
	llama_seed_write(seed);
	llama_ctrl_write(BIT(CSR_LLAMA_CTRL_RESET_OFFSET));
}

void hw_accel_rewind(uint32_t pos)
{
	llama_rewind_pos_write(pos);
	llama_ctrl_write(BIT(CSR_LLAMA_CTRL_REWIND_OFFSET));
}

#ifdef CSR_LLAMA_LOGIT_INDEX_ADDR
int hw_accel_has_draws(void)
{
	return 1;
}

int32_t hw_accel_logit(uint32_t i)
{
	llama_logit_index_write(i);
	return (int32_t)llama_logit_data_read();
}

void hw_accel_draw(uint32_t *base, uint32_t *weight, uint32_t *total)
{
	*base = llama_sample_base_read();
	*weight = llama_sample_weight_read();
	*total = llama_sample_total_read();
}
#else  /* the test stand-in core has neither */
int hw_accel_has_draws(void)
{
	return 0;
}

int32_t hw_accel_logit(uint32_t i)
{
	(void)i;
	return 0;
}

void hw_accel_draw(uint32_t *base, uint32_t *weight, uint32_t *total)
{
	*base = *weight = *total = 0;
}
#endif

void hw_accel_set_temperature(uint16_t inv_t_q8)
{
	llama_temperature_write(inv_t_q8);
}

void hw_accel_feed(uint16_t token)
{
	llama_port_token_in_write(token);
}

int hw_accel_out_valid(void)
{
	return (llama_port_status_read() >> CSR_LLAMA_PORT_STATUS_OUT_VALID_OFFSET) & 1;
}

uint16_t hw_accel_take(void)
{
	uint16_t t = (uint16_t)llama_port_token_out_read();

	llama_port_ctrl_write(BIT(CSR_LLAMA_PORT_CTRL_POP_OFFSET));
	return t;
}

uint32_t hw_accel_cycles(void)
{
	return llama_port_pass_cycles_read();
}

void hw_loop_start(uint16_t n)
{
	llama_port_loop_write(n);
}

void hw_loop_stop(void)
{
	llama_port_loop_write(0);
}

int hw_accel_in_flight(void)
{
	return (llama_port_status_read() >> CSR_LLAMA_PORT_STATUS_IN_FLIGHT_OFFSET) & 1;
}

uint32_t hw_accel_pos(void)
{
	uint32_t s = llama_status_read();

	return (s >> CSR_LLAMA_STATUS_POS_OFFSET) & ((1u << CSR_LLAMA_STATUS_POS_SIZE) - 1);
}

uint32_t hw_model_id(void)
{
	return llama_model_id_read();
}

/* A field of the multi-word model_cfg CSR; LiteX keeps the most significant word at the lowest
 * address. Offsets and sizes come from csr.h (packing: gateware/core.py). */
static uint32_t model_cfg_field(const uint32_t *w, unsigned offset, unsigned size)
{
	uint64_t v = w[offset / 32];

	if (offset / 32 + 1 < CSR_LLAMA_MODEL_CFG_SIZE)
		v |= (uint64_t)w[offset / 32 + 1] << 32;
	return (uint32_t)(v >> (offset % 32)) & (uint32_t)((1ull << size) - 1);
}

#define CFG_FIELD(w, NAME) \
	model_cfg_field(w, CSR_LLAMA_MODEL_CFG_##NAME##_OFFSET, CSR_LLAMA_MODEL_CFG_##NAME##_SIZE)

void hw_model_cfg(struct model_cfg *cfg)
{
	uint32_t w[CSR_LLAMA_MODEL_CFG_SIZE];          /* w[0]: least significant word */
	unsigned i, n = CSR_LLAMA_MODEL_CFG_SIZE;

	for (i = 0; i < n; i++)
		w[n - 1 - i] = csr_read_simple(CSR_LLAMA_MODEL_CFG_ADDR + 4 * i);
	cfg->dim = CFG_FIELD(w, DIM);
	cfg->n_layers = CFG_FIELD(w, N_LAYERS);
	cfg->n_heads = CFG_FIELD(w, N_HEADS);
	cfg->n_kv_heads = CFG_FIELD(w, N_KV_HEADS);
	cfg->hidden_dim = CFG_FIELD(w, HIDDEN_DIM);
	cfg->vocab_size = CFG_FIELD(w, VOCAB_SIZE);
	cfg->seq_len = CFG_FIELD(w, SEQ_LEN);
	cfg->lanes = CFG_FIELD(w, LANES);
}

uint32_t hw_sys_clk_freq(void)
{
	return CONFIG_CLOCK_FREQUENCY;
}

uint8_t hw_board(void)
{
	return BAKEDLLAMA_BOARD;
}

int hw_testing_core(void)
{
#ifdef BAKEDLLAMA_TESTING_CORE
	return 1;
#else
	return 0;
#endif
}
