/* edgepeft scoring for one asset, streaming: see edgepeft.c. Sizes, flash and RAM: edgepeft_model.h. */
#ifndef EDGEPEFT_H
#define EDGEPEFT_H

/* Forget every row seen (start a new stream). The state starts reset. */
void ep_reset(void);

/* Score one row of EP_C raw sensor values (the asset's units, channels in the trained order). Writes the row's
 * anomaly score (higher = more anomalous) to *score (when not NULL) and returns 1 when the row raises an alarm
 * (score over the calibrated threshold, with the detector's persistence; never in the first EP_WARMUP_ROWS rows). */
int ep_push(const float *row, float *score);

#ifdef EP_LEARN
/* Learning on the device (compile with -DEP_LEARN; the trained biases then live in RAM): one SGD step with rate lr
 * on the patch that the last EP_P rows completed (call it right after every EP_P-th ep_push). BitFit of the
 * channel block's o/ln2/fc1/fc2 biases and the head's ln_f/head biases. Writes the loss before the step; returns 0,
 * or -1 when no patch was just completed. */
int ep_learn(float lr, float *loss);

/* The trained biases, in the order o, ln2, fc1, fc2, ln_f, head (EP_LEARN_PARAMS floats). */
void ep_biases(float *out);
#define EP_LEARN_PARAMS (4 * EP_D + EP_FF + EP_P)
#endif

#endif
