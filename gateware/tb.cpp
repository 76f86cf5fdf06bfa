// Verilator testbench for BakedLlamaCore (built by gateware/sim.py).
//
// Reads commands on stdin, one per line, answers on stdout (one line each):
//   W adr val        CSR write                       -> "ok"
//   R adr            CSR read                        -> "<value>"
//   T tok            feed a token, wait for the output -> "<out> <cycles sink accept -> source valid>"
//   D n              read trace elements 0..n-1      -> "<v0> <v1> ..."
//   C                simulated cycles so far        -> "<cycles>"
//   Q                quit
// A forward pass that does not finish within BAKEDLLAMA_TIMEOUT cycles (default 20M) prints
// "TIMEOUT <cycles>" and exits with status 2. VCD: set BAKEDLLAMA_VCD=file (opt-in, slow).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <string>
#include <iostream>
#include "Vtop.h"
#include "verilated.h"
#if VM_TRACE
#include "verilated_vcd_c.h"
#endif

static Vtop *top;
static uint64_t ncycles = 0;
#if VM_TRACE
static VerilatedVcdC *vcd = nullptr;
#endif

static void tick() {
    top->sys_clk = 0;
    top->eval();
#if VM_TRACE
    if (vcd) vcd->dump(2 * ncycles);
#endif
    top->sys_clk = 1;
    top->eval();
#if VM_TRACE
    if (vcd) vcd->dump(2 * ncycles + 1);
#endif
    ncycles++;
}

static void csr_write(uint32_t adr, uint32_t val) {
    top->csr_adr = adr;
    top->csr_dat_w = val;
    top->csr_we = 1;
    tick();
    top->csr_we = 0;
    tick();
}

static uint32_t csr_read(uint32_t adr) {
    top->csr_adr = adr;
    tick();  // dat_r is registered
    top->eval();
    return top->csr_dat_r;
}

int main(int argc, char **argv) {
    Verilated::commandArgs(argc, argv);
    top = new Vtop;
    uint64_t timeout = 20000000ULL;
    if (const char *t = getenv("BAKEDLLAMA_TIMEOUT")) timeout = strtoull(t, nullptr, 10);
#if VM_TRACE
    if (const char *f = getenv("BAKEDLLAMA_VCD")) {
        Verilated::traceEverOn(true);
        vcd = new VerilatedVcdC;
        top->trace(vcd, 99);
        vcd->open(f);
    }
#endif
    top->sys_rst = 1;
    top->sink_valid = 0;
    top->source_ready = 0;
    top->csr_we = 0;
    for (int i = 0; i < 8; i++) tick();
    top->sys_rst = 0;
    tick();
    std::string line;
    char cmd[16];
    while (std::getline(std::cin, line)) {
        if (line.empty()) continue;
        unsigned long a = 0, b = 0;
        int n = sscanf(line.c_str(), "%15s %lu %lu", cmd, &a, &b);
        if (n < 1) continue;
        if (!strcmp(cmd, "W")) {
            csr_write(a, b);
            printf("ok\n");
        } else if (!strcmp(cmd, "R")) {
            printf("%u\n", csr_read(a));
        } else if (!strcmp(cmd, "T")) {
            top->sink_token = a;
            top->sink_valid = 1;
            uint64_t start = ncycles;
            top->eval();
            while (!top->sink_ready) {
                tick();
                top->eval();
                if (ncycles - start > timeout) { printf("TIMEOUT %lu\n", (unsigned long)(ncycles - start)); fflush(stdout); return 2; }
            }
            tick();  // accept edge
            uint64_t accept = ncycles;
            top->sink_valid = 0;
            top->source_ready = 1;
            top->eval();
            while (!top->source_valid) {
                tick();
                top->eval();
                if (ncycles - accept > timeout) { printf("TIMEOUT %lu\n", (unsigned long)(ncycles - accept)); fflush(stdout); return 2; }
            }
            uint32_t out = top->source_token;
            uint64_t measured = ncycles - accept + 1;
            tick();  // taken
            top->source_ready = 0;
            printf("%u %lu\n", out, (unsigned long)measured);
        } else if (!strcmp(cmd, "D")) {
            // trace_index / trace_data CSR addresses come in as the two arguments of "A" (below)
            printf("error: use A first\n");
        } else if (!strcmp(cmd, "A")) {
            // A idx_adr data_adr n : read trace elements 0..n-1
            unsigned long cnt = 0;
            sscanf(line.c_str(), "%15s %lu %lu %lu", cmd, &a, &b, &cnt);
            for (unsigned long i = 0; i < cnt; i++) {
                csr_write(a, i);
                int32_t v = (int32_t)csr_read(b);
                printf(i + 1 < cnt ? "%d " : "%d", v);
            }
            printf("\n");
        } else if (!strcmp(cmd, "C")) {
            printf("%lu\n", (unsigned long)ncycles);
        } else if (!strcmp(cmd, "Q")) {
            break;
        } else {
            printf("error: unknown command %s\n", cmd);
        }
        fflush(stdout);
    }
#if VM_TRACE
    if (vcd) vcd->close();
#endif
    top->final();
    delete top;
    return 0;
}
