/* edgepeft scoring for microcontrollers: one asset's detector (the tiny base with its adapter merged in, int8
 * weights) and the Detector v2 scoring core, streaming one row at a time.
 *
 * C99, no malloc, no global constructors, libm only for expf/logf/sqrtf/erff/log1pf (newlib has them). Every
 * buffer is static and sized at compile time by edgepeft_model.h, which `edgepeft export-c` writes for one
 * asset together with its weights; its header comment states the flash and RAM this needs.
 *
 * Per row: scale it, predict its patch (once per patch: the forecast from the last window of every channel, and
 * each channel's blind prediction from the others), turn the errors into dynamics evidence, add the state
 * evidence (level, scale, relation over trailing windows), fuse the kinds as the detector calibrated them, and
 * smooth. Mirrors edgepeft.detect.core.ScoringCore and edgepeft.models.patch_encoder step by step.
 */
#include <math.h>
#include <string.h>

#include "edgepeft.h"
#include "edgepeft_model.h"

#define T_TOK (EP_N + 1)      /* tokens per channel: the statistics token and one per patch */
#define HD (EP_D / EP_HEADS)  /* attention head width */
#define HIST (EP_L - EP_P)    /* rows of history a patch prediction reads */
#define MIN_STD 1e-2f
#define LN_EPS 1e-5f
#define SCALE_FLOOR 0.05
#define RING (EP_STATE_WINDOW > EP_RELATION_SMOOTHING ? EP_STATE_WINDOW : EP_RELATION_SMOOTHING)
#define WIDE (2 * EP_C > T_TOK ? 2 * EP_C : T_TOK)  /* the most tokens one attention reads or writes */

typedef struct {
    const signed char *w; /* (out, in) int8 */
    float scale;           /* one scale per matrix */
    const float *b;        /* (out) */
    int out, in;
} linear_t;

typedef struct {
    const float *g, *b;
} norm_t;

typedef struct {
    norm_t ln1, ln2;
    linear_t q, k, v, o, fc1, fc2;
} block_t;

#include "edgepeft_weights.h"

/* ------------------------------------------------------------------------------------------ state (static) */
static float hist[HIST][EP_C];        /* the last HIST scaled rows, oldest first */
static long n_rows;                    /* rows seen */
static float pred_f[EP_P][EP_C];       /* this patch's forecast */
static float pred_b[EP_P][EP_C];       /* this patch's blind predictions */
static float win_mean[EP_C], win_std[EP_C];  /* this patch's window statistics per channel */
static float kept_x1[EP_C][EP_D];      /* the forecast's channel-block tokens after attention (for learning) */
static float patch_rows[EP_P][EP_C];   /* this patch's scaled rows so far */
static double ring_x[RING][EP_C];      /* trailing scaled rows (state evidence) */
static double ring_raw[EP_SMOOTHING];  /* trailing raw scores */
static int alarm_on, run_over, run_under;

/* scratch */
static float tok[EP_C][T_TOK][EP_D];   /* temporal features of every channel */
static float xa[T_TOK][EP_D], xn[T_TOK][EP_D], qb[WIDE][EP_D], kb[WIDE][EP_D], vb[WIDE][EP_D], att[WIDE];
static float ff[EP_FF], tmp[EP_D];
static float mix[EP_C][EP_D], ctx[2 * EP_C][EP_D], ctxn[2 * EP_C][EP_D], qry[EP_C][EP_D];

static void linear(const linear_t *l, const float *x, float *y) {
    for (int o = 0; o < l->out; o++) {
        const signed char *row = l->w + (long)o * l->in;
        float acc = 0.0f;
        for (int i = 0; i < l->in; i++) acc += (float)row[i] * x[i];
        y[o] = l->b[o] + l->scale * acc;
    }
}

static void layer_norm(const norm_t *n, const float *x, float *y) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < EP_D; i++) mean += x[i];
    mean /= EP_D;
    for (int i = 0; i < EP_D; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= EP_D;
    float inv = 1.0f / sqrtf(var + LN_EPS);
    for (int i = 0; i < EP_D; i++) y[i] = (x[i] - mean) * inv * n->g[i] + n->b[i];
}

static float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* x[nq] += attention(ln1 queries, keys/values from kv[nk] (already normed), allowed(i, j)), then the MLP. */
static void block(const block_t *blk, float (*x)[EP_D], int nq, float (*kv)[EP_D], int nk,
                  int (*allowed)(int, int), float (*keep)[EP_D]) {
    for (int t = 0; t < nk; t++) {
        linear(&blk->k, kv[t], kb[t]);
        linear(&blk->v, kv[t], vb[t]);
    }
    for (int t = 0; t < nq; t++) {
        layer_norm(&blk->ln1, x[t], tmp);
        linear(&blk->q, tmp, qb[t]);
    }
    for (int t = 0; t < nq; t++) {
        float out[EP_D];
        for (int h = 0; h < EP_HEADS; h++) {
            float peak = -INFINITY, total = 0.0f;
            for (int s = 0; s < nk; s++) {
                if (allowed && !allowed(t, s)) { att[s] = -INFINITY; continue; }
                float dot = 0.0f;
                for (int i = 0; i < HD; i++) dot += qb[t][h * HD + i] * kb[s][h * HD + i];
                att[s] = dot / sqrtf((float)HD);
                if (att[s] > peak) peak = att[s];
            }
            for (int s = 0; s < nk; s++) {
                att[s] = att[s] == -INFINITY ? 0.0f : expf(att[s] - peak);
                total += att[s];
            }
            for (int i = 0; i < HD; i++) {
                float acc = 0.0f;
                for (int s = 0; s < nk; s++) acc += att[s] * vb[s][h * HD + i];
                out[h * HD + i] = acc / total;
            }
        }
        linear(&blk->o, out, tmp);
        for (int i = 0; i < EP_D; i++) x[t][i] += tmp[i];
    }
    if (keep) memcpy(keep, x, sizeof(float) * EP_D * nq);  /* after attention, before the MLP (learning reads it) */
    for (int t = 0; t < nq; t++) {
        layer_norm(&blk->ln2, x[t], tmp);
        linear(&blk->fc1, tmp, ff);
        for (int i = 0; i < EP_FF; i++) ff[i] = gelu(ff[i]);
        linear(&blk->fc2, ff, tmp);
        for (int i = 0; i < EP_D; i++) x[t][i] += tmp[i];
    }
}

/* ------------------------------------------------------------------------------------------ the model */
/* Temporal features of channel c for the patch that starts now: patches 0..N-2 are the history (hidden where
 * they precede the stream), patch N-1 is the target (hidden). Writes tok[c]; returns its window mean and std. */
static void temporal(int c, float *mean_out, float *std_out) {
    int first_patch = EP_N - 1 - (int)(n_rows / EP_P < EP_N - 1 ? n_rows / EP_P : EP_N - 1);
    double sum = 0.0, count = 0.0;
    for (int p = first_patch; p < EP_N - 1; p++)
        for (int r = 0; r < EP_P; r++) { sum += hist[p * EP_P + r][c]; count += 1.0; }
    float mean = 0.0f, std = 1.0f;
    if (count > 0) {
        mean = (float)(sum / count);
        double var = 0.0;
        for (int p = first_patch; p < EP_N - 1; p++)
            for (int r = 0; r < EP_P; r++) { double d = hist[p * EP_P + r][c] - mean; var += d * d; }
        std = sqrtf((float)(var / count));
        if (std < MIN_STD) std = MIN_STD;
    }
    float stats[2] = {mean, logf(std)};
    linear(&stat_embed, stats, xa[0]);
    for (int p = 0; p < EP_N; p++) {
        if (p < first_patch || p == EP_N - 1) {
            memcpy(xa[p + 1], mask_token, sizeof(float) * EP_D);
        } else {
            float patch[EP_P];
            for (int r = 0; r < EP_P; r++) patch[r] = (hist[p * EP_P + r][c] - mean) / std;
            linear(&patch_embed, patch, xa[p + 1]);
        }
    }
    for (int t = 0; t < T_TOK; t++)
        for (int i = 0; i < EP_D; i++) xa[t][i] += pos_embed[t][i];
    for (int l = 0; l < EP_LAYERS; l++) {
        for (int t = 0; t < T_TOK; t++) layer_norm(&blocks[l].ln1, xa[t], xn[t]);
        block(&blocks[l], xa, T_TOK, xn, T_TOK, 0, 0);
    }
    memcpy(tok[c], xa, sizeof(xa));
    *mean_out = mean;
    *std_out = std;
}

static int blind_allowed(int query, int key) { return key < EP_C ? key != query : key - EP_C == query; }

static void head(const float *x, float *patch) {
    layer_norm(&ln_f, x, tmp);
    linear(&head_linear, tmp, patch);
}

/* Forecast and blind predictions of the patch that starts at row n_rows. */
static void predict_patch(void) {
    float *mean = win_mean, *std = win_std;
    for (int c = 0; c < EP_C; c++) temporal(c, &mean[c], &std[c]);
    /* The cross-channel block at the target patch's token: every channel sees every channel. */
    for (int c = 0; c < EP_C; c++)
        for (int i = 0; i < EP_D; i++) mix[c][i] = tok[c][EP_N][i] + tag_proj[c][i];
    memcpy(ctx, mix, sizeof(mix));
    for (int c = 0; c < EP_C; c++) layer_norm(&channel_block.ln1, ctx[c], ctxn[c]);
    block(&channel_block, mix, EP_C, ctxn, EP_C, 0, kept_x1);
    for (int c = 0; c < EP_C; c++) {
        float patch[EP_P];
        head(mix[c], patch);
        for (int r = 0; r < EP_P; r++) pred_f[r][c] = patch[r] * std[c] + mean[c];
    }
    if (!EP_BLIND) return;
    /* Blind: channel c's query is the data-free hidden channel, attending to the others' real tokens and to itself. */
    for (int c = 0; c < EP_C; c++)
        for (int i = 0; i < EP_D; i++) {
            qry[c][i] = blank[i] + tag_proj[c][i];
            ctx[EP_C + c][i] = qry[c][i];
        }
    for (int c = 0; c < 2 * EP_C; c++) layer_norm(&channel_block.ln1, ctx[c], ctxn[c]);
    block(&channel_block, qry, EP_C, ctxn, 2 * EP_C, blind_allowed, 0);
    for (int c = 0; c < EP_C; c++) {
        float patch[EP_P];
        head(qry[c], patch);
        for (int r = 0; r < EP_P; r++) pred_b[r][c] = patch[r];
    }
}

/* ------------------------------------------------------------------------------------------ scoring */
static double trailing(int window, int c) {  /* mean of the last `window` scaled rows of channel c */
    long have = n_rows + 1 < window ? n_rows + 1 : window;
    double sum = 0.0;
    for (long k = 0; k < have; k++) sum += ring_x[(n_rows - k) % RING][c];
    return sum / (double)have;
}

static double outside(double v, double low, double high) {
    return v < low ? low - v : (v > high ? v - high : 0.0);
}

void ep_reset(void) {
    memset(hist, 0, sizeof(hist));
    n_rows = 0;
    alarm_on = run_over = run_under = 0;
}

int ep_push(const float *row, float *score_out) {
    float x[EP_C];
    for (int c = 0; c < EP_C; c++) x[c] = (float)(((double)row[c] - scaler_mean[c]) / scaler_scale[c]);
    if (n_rows % EP_P == 0) predict_patch();
    int r = (int)(n_rows % EP_P);
    for (int c = 0; c < EP_C; c++) ring_x[n_rows % RING][c] = x[c];
    memcpy(patch_rows[r], x, sizeof(x));

    double kind[EP_KINDS][EP_C];
    for (int c = 0; c < EP_C; c++) {
        float ef = (pred_f[r][c] - x[c]) * (pred_f[r][c] - x[c]);
        float eb = EP_BLIND ? (pred_b[r][c] - x[c]) * (pred_b[r][c] - x[c]) : ef;
        double dyn = (double)ef / channel_error[c][0] * evidence_weights[c][0]
                     + (double)eb / channel_error[c][1] * evidence_weights[c][1];
        double level = trailing(EP_STATE_WINDOW, c);
        double square = 0.0;
        long have = n_rows + 1 < EP_STATE_WINDOW ? n_rows + 1 : EP_STATE_WINDOW;
        for (long k = 0; k < have; k++) square += ring_x[(n_rows - k) % RING][c] * ring_x[(n_rows - k) % RING][c];
        double var = square / (double)have - level * level;
        double scale = log(sqrt(var > 0.0 ? var : 0.0) + SCALE_FLOOR);
        double lo = outside(level, level_low[c], level_high[c]) / level_std[c];
        double so = outside(scale, scale_low[c], scale_high[c]) / scale_std[c];
        for (int k = 0; k < EP_KINDS; k++) {
            switch (kinds[k]) {
                case KIND_DYNAMICS: kind[k][c] = dyn; break;
                case KIND_LEVEL: kind[k][c] = lo * lo; break;
                case KIND_SCALE: kind[k][c] = so * so; break;
                default: kind[k][c] = 0.0; break; /* relation: below, it needs every channel */
            }
        }
    }
    /* relation: each channel against its leave-one-out linear prediction from the others (smoothed rows) */
    double centred[EP_C];
    for (int c = 0; c < EP_C; c++) {
        long have = n_rows + 1 < EP_RELATION_SMOOTHING ? n_rows + 1 : EP_RELATION_SMOOTHING;
        double sum = 0.0;
        for (long k = 0; k < have; k++) sum += ring_x[(n_rows - k) % RING][c];
        centred[c] = sum / (double)have - relation_mean[c];
    }
    for (int c = 0; c < EP_C; c++) {
        double acc = 0.0;
        for (int j = 0; j < EP_C; j++) acc += centred[j] * relation_precision[j][c];
        double residual = EP_C > 1 ? acc / relation_precision[c][c] : 0.0;
        for (int k = 0; k < EP_KINDS; k++)
            if (kinds[k] == KIND_RELATION) kind[k][c] = residual * residual;
    }
    double raw = -INFINITY;
    for (int k = 0; k < EP_KINDS; k++)
        for (int c = 0; c < EP_C; c++) {
            double v = kind_weight[k] * (log1p(kind[k][c] / kind_typical[k][c]) - kind_centre[k]) / kind_spread[k];
            if (v > raw) raw = v;
        }
    ring_raw[n_rows % EP_SMOOTHING] = raw;
    long have = n_rows + 1 < EP_SMOOTHING ? n_rows + 1 : EP_SMOOTHING;
    double sum = 0.0;
    for (long k = 0; k < have; k++) sum += ring_raw[(n_rows - k) % EP_SMOOTHING];
    double score = sum / (double)have;
    if (score_out) *score_out = (float)score;

    /* history for the next patch prediction */
    memmove(hist[0], hist[1], sizeof(float) * (HIST - 1) * EP_C);
    memcpy(hist[HIST - 1], x, sizeof(float) * EP_C);

    /* alarm persistence, held during warm-up */
    int above = score > EP_THRESHOLD;
    run_over = above ? run_over + 1 : 0;
    run_under = above ? 0 : run_under + 1;
    if (!alarm_on && run_over >= EP_RAISE_AFTER) alarm_on = 1;
    if (alarm_on && run_under >= EP_CLEAR_AFTER) alarm_on = 0;
    int warming = n_rows < EP_WARMUP_ROWS;
    n_rows++;
    return alarm_on && !warming;
}

#ifdef EP_LEARN
/* ------------------------------------------------------------------------------------------ learning */
/* BitFit on the device: the biases of the channel block's output projection and MLP (o, ln2, fc1, fc2) and of the
 * head (ln_f, head), one SGD step on the forecast of the patch the last EP_P rows completed. Loss: the mean over
 * channels and rows of (prediction - row)^2 in the window's own units (divided by its std), as in adaptation.
 * Exact gradients: these biases sit after the cross-channel attention, so each channel's token is independent. */

static void layer_norm_back(const float *g, const float *x, const float *dy, float *dx) {
    float mean = 0.0f, var = 0.0f, xhat[EP_D], dxhat[EP_D], m1 = 0.0f, m2 = 0.0f;
    for (int i = 0; i < EP_D; i++) mean += x[i];
    mean /= EP_D;
    for (int i = 0; i < EP_D; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= EP_D;
    float inv = 1.0f / sqrtf(var + LN_EPS);
    for (int i = 0; i < EP_D; i++) {
        xhat[i] = (x[i] - mean) * inv;
        dxhat[i] = dy[i] * g[i];
        m1 += dxhat[i];
        m2 += dxhat[i] * xhat[i];
    }
    m1 /= EP_D;
    m2 /= EP_D;
    for (int i = 0; i < EP_D; i++) dx[i] = inv * (dxhat[i] - m1 - xhat[i] * m2);
}

static void linear_back(const linear_t *l, const float *dy, float *dx) {  /* dx = W^T dy */
    for (int i = 0; i < l->in; i++) dx[i] = 0.0f;
    for (int o = 0; o < l->out; o++) {
        const signed char *row = l->w + (long)o * l->in;
        float d = l->scale * dy[o];
        for (int i = 0; i < l->in; i++) dx[i] += (float)row[i] * d;
    }
}

static float grad_o[EP_D], grad_ln2[EP_D], grad_fc1[EP_FF], grad_fc2[EP_D], grad_lnf[EP_D], grad_head[EP_P];

int ep_learn(float lr, float *loss_out) {
    if (n_rows == 0 || n_rows % EP_P != 0) return -1;  /* only right after a patch is complete */
    const block_t *blk = &channel_block;
    float h[EP_D], a[EP_FF], gact[EP_FF], x2[EP_D], z[EP_D], y[EP_P];
    float dy[EP_P], dz[EP_D], dx2[EP_D], dg[EP_FF], da[EP_FF], dh[EP_D], dx1[EP_D];
    double loss = 0.0;
    memset(grad_o, 0, sizeof(grad_o)); memset(grad_ln2, 0, sizeof(grad_ln2)); memset(grad_fc1, 0, sizeof(grad_fc1));
    memset(grad_fc2, 0, sizeof(grad_fc2)); memset(grad_lnf, 0, sizeof(grad_lnf)); memset(grad_head, 0, sizeof(grad_head));
    for (int c = 0; c < EP_C; c++) {
        const float *x1 = kept_x1[c];
        layer_norm(&blk->ln2, x1, h);
        linear(&blk->fc1, h, a);
        for (int i = 0; i < EP_FF; i++) gact[i] = gelu(a[i]);
        linear(&blk->fc2, gact, x2);
        for (int i = 0; i < EP_D; i++) x2[i] += x1[i];
        layer_norm(&ln_f, x2, z);
        linear(&head_linear, z, y);
        for (int r = 0; r < EP_P; r++) {
            float target = (patch_rows[r][c] - win_mean[c]) / win_std[c];
            float diff = y[r] - target;
            loss += (double)diff * diff;
            dy[r] = 2.0f * diff / (float)(EP_C * EP_P);
            grad_head[r] += dy[r];
        }
        linear_back(&head_linear, dy, dz);
        for (int i = 0; i < EP_D; i++) grad_lnf[i] += dz[i];
        layer_norm_back(ln_f.g, x2, dz, dx2);
        for (int i = 0; i < EP_D; i++) grad_fc2[i] += dx2[i];
        linear_back(&blk->fc2, dx2, dg);
        for (int i = 0; i < EP_FF; i++) {
            float phi = 0.3989422804014327f * expf(-0.5f * a[i] * a[i]);
            da[i] = dg[i] * (0.5f * (1.0f + erff(a[i] * 0.70710678118654752f)) + a[i] * phi);
            grad_fc1[i] += da[i];
        }
        linear_back(&blk->fc1, da, dh);
        for (int i = 0; i < EP_D; i++) grad_ln2[i] += dh[i];
        layer_norm_back(blk->ln2.g, x1, dh, dx1);
        for (int i = 0; i < EP_D; i++) grad_o[i] += dx1[i] + dx2[i];
    }
    for (int i = 0; i < EP_D; i++) {
        cblock_o_b[i] -= lr * grad_o[i];
        cblock_ln2_b[i] -= lr * grad_ln2[i];
        cblock_fc2_b[i] -= lr * grad_fc2[i];
        ln_f_b[i] -= lr * grad_lnf[i];
    }
    for (int i = 0; i < EP_FF; i++) cblock_fc1_b[i] -= lr * grad_fc1[i];
    for (int r = 0; r < EP_P; r++) head_b[r] -= lr * grad_head[r];
    if (loss_out) *loss_out = (float)(loss / (EP_C * EP_P));
    return 0;
}

void ep_biases(float *out) {
    memcpy(out, cblock_o_b, sizeof(float) * EP_D);
    memcpy(out + EP_D, cblock_ln2_b, sizeof(float) * EP_D);
    memcpy(out + 2 * EP_D, cblock_fc1_b, sizeof(float) * EP_FF);
    memcpy(out + 2 * EP_D + EP_FF, cblock_fc2_b, sizeof(float) * EP_D);
    memcpy(out + 3 * EP_D + EP_FF, ln_f_b, sizeof(float) * EP_D);
    memcpy(out + 4 * EP_D + EP_FF, head_b, sizeof(float) * EP_P);
}
#endif
