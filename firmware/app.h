/* bakedllama firmware: protocol handling (app.c), independent of the hardware (hw.h). */
#ifndef BAKEDLLAMA_APP_H
#define BAKEDLLAMA_APP_H

void app_init(void);   /* after hw_init(): reads the model config, resets the accelerator, banner */
void app_poll(void);   /* read the link, answer at most one frame (a generation runs to its end) */

#endif
