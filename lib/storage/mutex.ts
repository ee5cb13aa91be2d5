// A minimal FIFO async mutex.

export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  /** Run fn with the lock held; calls run one after another in arrival order. */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    // The next holder waits for this one whether it succeeded or failed.
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
