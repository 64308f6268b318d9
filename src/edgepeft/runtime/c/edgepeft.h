/* edgepeft scoring for one asset, streaming: see edgepeft.c. Sizes, flash and RAM: edgepeft_model.h. */
#ifndef EDGEPEFT_H
#define EDGEPEFT_H

/* Forget every row seen (start a new stream). The state starts reset. */
void ep_reset(void);

/* Score one row of EP_C raw sensor values (the asset's units, channels in the trained order). Writes the row's
 * anomaly score (higher = more anomalous) to *score (when not NULL) and returns 1 when the row raises an alarm
 * (score over the calibrated threshold, with the detector's persistence; never in the first EP_WARMUP_ROWS rows). */
int ep_push(const float *row, float *score);

#endif
