/* What the firmware needs from the hardware. hw_litex.c implements it with LiteX's generated
 * csr.h; tests/native/hw_native.c (firmware/native/) with a socket and a model of the test core. */
#ifndef BAKEDLLAMA_HW_H
#define BAKEDLLAMA_HW_H

#include <stdint.h>

#define BOARD_SIM    1
#define BOARD_ULX3S  2

struct model_cfg {
	uint32_t dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, seq_len, lanes;
};

void hw_init(void);

/* UART: polled. */
int hw_uart_readable(void);
uint8_t hw_uart_read(void);
int hw_uart_writable(void);
void hw_uart_write(uint8_t c);

/* Free-running cycle counter (wraps; differences are exact below 2^32 cycles). */
uint32_t hw_cycles_now(void);

/* Accelerator (gateware/INTERFACE.md). */
void hw_accel_reset(uint32_t seed);              /* seed CSR, then ctrl.reset */
void hw_accel_set_temperature(uint16_t inv_t_q8);
void hw_accel_rewind(uint32_t pos);              /* rewind_pos CSR, then ctrl.rewind (pos <= current) */
void hw_accel_feed(uint16_t token);              /* offer a token on the accelerator's sink */
int hw_accel_out_valid(void);                    /* a token waits in the port's FIFO */
uint16_t hw_accel_take(void);                    /* pop it from the FIFO */
uint32_t hw_accel_cycles(void);                  /* cycles of the pass that made that token */
void hw_loop_start(uint16_t n);                  /* feed the next n outputs back (LlamaPort) */
void hw_loop_stop(void);
int hw_accel_in_flight(void);                    /* a pass runs or its token is on the way */
uint32_t hw_accel_pos(void);
int hw_accel_has_draws(void);                    /* logit readback and draw CSRs present */
int32_t hw_accel_logit(uint32_t i);              /* the last pass's Q8 logit i (not running) */
void hw_accel_draw(uint32_t *base, uint32_t *weight, uint32_t *total);  /* the last draw */
uint32_t hw_model_id(void);
void hw_model_cfg(struct model_cfg *cfg);

/* Build facts. */
uint32_t hw_sys_clk_freq(void);
uint8_t hw_board(void);
int hw_testing_core(void);                       /* the SoC carries the test stand-in */

#endif
