// An independent big-endian byte builder for tests (pg-protocol's test BufferList). It deliberately shares no code
// with lib/protocol: every integer is split into bytes by hand, so a wrong encoder cannot hide behind the same
// bug in the bytes a test expects.
//
//   bytes().u32(0x25609513).u16(flags).u16(type).u64(cookie).u64(offset).u32(length).buf()

export class ByteBuilder {
  private readonly out: number[] = [];

  /** Bytes written so far. */
  get length(): number {
    return this.out.length;
  }

  u8(v: number): this {
    return this.uint(BigInt(checkInt(v, 8)), 1);
  }

  u16(v: number): this {
    return this.uint(BigInt(checkInt(v, 16)), 2);
  }

  u32(v: number): this {
    return this.uint(BigInt(checkInt(v, 32)), 4);
  }

  /** 64-bit unsigned; numbers must be safe integers, bigints any value in [0, 2^64). */
  u64(v: number | bigint): this {
    let big: bigint;
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`u64: ${v} is not a safe non-negative integer`);
      big = BigInt(v);
    } else {
      big = v;
    }
    if (big < 0n || big >= 1n << 64n) throw new RangeError(`u64: ${big} out of range`);
    return this.uint(big, 8);
  }

  /** UTF-8 bytes of s, no length prefix, no terminator. */
  str(s: string): this {
    return this.raw(new TextEncoder().encode(s));
  }

  /** A string preceded by its UTF-8 byte length as 32 bits. */
  str32(s: string): this {
    const body = new TextEncoder().encode(s);
    return this.u32(body.length).raw(body);
  }

  /** Bytes copied as they are. */
  raw(data: Uint8Array | readonly number[]): this {
    for (const b of data) {
      if (!Number.isInteger(b) || b < 0 || b > 0xff) throw new RangeError(`raw: ${b} is not a byte`);
      this.out.push(b);
    }
    return this;
  }

  /** n bytes of value fill (default zero). */
  fill(n: number, value = 0): this {
    for (let i = 0; i < n; i++) this.u8(value);
    return this;
  }

  zeros(n: number): this {
    return this.fill(n, 0);
  }

  buf(): Buffer {
    return Buffer.from(this.out);
  }

  private uint(v: bigint, width: number): this {
    for (let i = width - 1; i >= 0; i--) this.out.push(Number((v >> BigInt(8 * i)) & 0xffn));
    return this;
  }
}

function checkInt(v: number, bits: number): number {
  if (!Number.isInteger(v) || v < 0 || v >= 2 ** bits) throw new RangeError(`u${bits}: ${v} out of range`);
  return v;
}

export function bytes(): ByteBuilder {
  return new ByteBuilder();
}

/** Concatenate buffers (a test-side helper, so expected streams are not built with codec code). */
export function cat(...parts: Buffer[]): Buffer {
  return Buffer.concat(parts);
}

/** Every way to cut data into two pieces: [data[0:i], data[i:]] for i in 0..length. */
export function* splits2(data: Buffer): Generator<Buffer[]> {
  for (let i = 0; i <= data.length; i++) yield [data.subarray(0, i), data.subarray(i)];
}

/**
 * Every way to cut data into three pieces at i ≤ j. Quadratic in length: keep streams to a few hundred bytes,
 * or pass a stride to sample every stride-th j.
 */
export function* splits3(data: Buffer, stride = 1): Generator<Buffer[]> {
  for (let i = 0; i <= data.length; i++) {
    for (let j = i; j <= data.length; j += stride) {
      yield [data.subarray(0, i), data.subarray(i, j), data.subarray(j)];
    }
  }
}

/** A string whose UTF-8 encoding is exactly n bytes (ASCII), deterministic. */
export function asciiOfLength(n: number, seed = 0): string {
  let s = '';
  for (let i = 0; i < n; i++) s += String.fromCharCode(0x61 + ((i + seed) % 26));
  return s;
}

/** A small deterministic PRNG (mulberry32) so randomised tests are reproducible. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
