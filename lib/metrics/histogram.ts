// A latency histogram cheap enough for the request hot path: fixed upper bounds, counts in a typed array,
// no labels and no allocation per observation. prom-client's own Histogram hashes its label set on every
// observe(); here each (export, command) owns one of these and the Prometheus view is built at scrape time.

/** Upper bounds in seconds: 25 µs … 10 s, dense where NBD requests on one machine land. */
export const LATENCY_BUCKETS: readonly number[] = Object.freeze([
  0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
]);

export interface HistogramSnapshot {
  /** Cumulative counts per upper bound (Prometheus `le`), the last one for +Inf. */
  cumulative: number[];
  sum: number;
  count: number;
}

export class LatencyHistogram {
  /** Per-bucket (not cumulative) counts; index bounds.length is the +Inf bucket. */
  private readonly counts: Float64Array;
  sum = 0;
  count = 0;

  constructor(readonly bounds: readonly number[] = LATENCY_BUCKETS) {
    for (let i = 1; i < bounds.length; i++) {
      if (!(bounds[i]! > bounds[i - 1]!)) throw new RangeError('histogram bounds must increase');
    }
    this.counts = new Float64Array(bounds.length + 1);
  }

  observe(seconds: number): void {
    const b = this.bounds;
    let i = 0;
    while (i < b.length && seconds > b[i]!) i++;
    this.counts[i]!++;
    this.sum += seconds;
    this.count++;
  }

  snapshot(): HistogramSnapshot {
    const cumulative: number[] = [];
    let acc = 0;
    for (let i = 0; i < this.counts.length; i++) cumulative.push((acc += this.counts[i]!));
    return { cumulative, sum: this.sum, count: this.count };
  }
}
