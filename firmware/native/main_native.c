/* Native build of the firmware for the tests: same app.c / proto.c, hw_native.c below them. */
#include "app.h"
#include "hw.h"

int hw_native_args(int argc, char **argv);

int main(int argc, char **argv)
{
	if (hw_native_args(argc, argv))
		return 2;
	hw_init();
	app_init();
	for (;;)
		app_poll();
	return 0;
}
