// The timing harness of the micro-benchmarks: each case times the current implementation and its alternatives
// of one operation, interleaved, and reports the median ns/op with the ratio to the current code.
// Plain node + process.hrtime.bigint(); no benchmark library.

const SAMPLE_MS = Number(process.env['BENCH_MS'] ?? 40);
const SAMPLES = 7;

/** Calls of fn that take about SAMPLE_MS (this also warms fn up). */
function calibrate(fn: () => void): number {
  let batch = 1;
  for (;;) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < batch; i++) fn();
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    if (ms >= SAMPLE_MS / 4 || batch >= 1 << 26) return Math.max(1, Math.round((batch * SAMPLE_MS) / Math.max(ms, 0.001)));
    batch *= 4;
  }
}

/** ns per call of fn over `batch` calls. */
function sample(fn: () => void, batch: number): number {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < batch; i++) fn();
  return Number(process.hrtime.bigint() - t0) / batch;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

interface Row {
  group: string;
  variant: string;
  ns: number;
  ratio: number | null;
}
const rows: Row[] = [];

/**
 * Time the current implementation and its alternatives of the same operation (fn performs opsPerCall
 * operations). After calibration and one warm-up sample each, SAMPLES rounds time every variant once, in a
 * rotating order, so that drifting machine load hits all variants alike; the result is the median per variant.
 */
export function compare(group: string, current: [string, () => void], alternatives: Array<[string, () => void]>, opsPerCall = 1): void {
  const variants = [current, ...alternatives];
  const batches = variants.map(([, fn]) => calibrate(fn));
  variants.forEach(([, fn], i) => sample(fn, batches[i]!));
  const times: number[][] = variants.map(() => []);
  for (let round = 0; round < SAMPLES; round++) {
    for (let k = 0; k < variants.length; k++) {
      const i = (k + round) % variants.length;
      times[i]!.push(sample(variants[i]![1], batches[i]!) / opsPerCall);
    }
  }
  const base = median(times[0]!);
  variants.forEach(([name], i) => {
    const ns = median(times[i]!);
    rows.push({ group, variant: name, ns, ratio: i === 0 ? null : ns / base });
  });
}

/** Alternatives must compute what the current code computes before they are timed. */
export function check(cond: boolean, what: string): void {
  if (!cond) throw new Error(`alternative disagrees with the current implementation: ${what}`);
}

/** Print every compared group. */
export function report(title: string, footer = ''): void {
  const w = Math.max(...rows.map((r) => r.variant.length));
  let group = '';
  process.stdout.write(`${title}: node ${process.version}, ${SAMPLES} samples of ~${SAMPLE_MS} ms each, median ns/op\n`);
  for (const r of rows) {
    if (r.group !== group) {
      group = r.group;
      process.stdout.write(`\n${group}\n`);
    }
    const ratio = r.ratio === null ? '' : `  ${r.ratio.toFixed(2)}x current`;
    process.stdout.write(`  ${r.variant.padEnd(w)}  ${r.ns.toFixed(1).padStart(9)} ns/op${ratio}\n`);
  }
  if (footer) process.stdout.write(`\n${footer}\n`);
}
