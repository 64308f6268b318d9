/* A host-side driver for the exported detector: reads rows of EP_C numbers from stdin (whitespace separated),
 * prints "score alarm" per row, and the scoring time on stderr. Build: cc -std=c99 -O2 example_main.c edgepeft.c -lm
 * (not needed on a microcontroller, where the application calls ep_push itself). */
#include <stdio.h>
#include <time.h>

#include "edgepeft.h"
#include "edgepeft_model.h"

int main(void) {
    float row[EP_C], score;
    long rows = 0;
    double seconds = 0.0;
    for (;;) {
        for (int c = 0; c < EP_C; c++)
            if (scanf("%f", &row[c]) != 1) goto done;
        clock_t started = clock();
        int alarm = ep_push(row, &score);
        seconds += (double)(clock() - started) / CLOCKS_PER_SEC;
        printf("%.9g %d\n", score, alarm);
        rows++;
    }
done:
    fprintf(stderr, "rows %ld seconds %.6f\n", rows, seconds);
    return 0;
}
