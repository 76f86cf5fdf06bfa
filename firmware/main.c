/* bakedllama firmware entry point (LiteX bare-metal, no BIOS: this program is the ROM). */
#include "app.h"
#include "hw.h"

void isr(void);
int main(void);

/* crt0.S jumps here on a trap; the firmware enables no interrupt, so there is nothing to do. */
void isr(void)
{
}

int main(void)
{
	hw_init();
	app_init();
	for (;;)
		app_poll();
	return 0;
}
