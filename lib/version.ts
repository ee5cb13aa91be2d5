// nbdmirror's version, from the package.json next to the code (lib/ in the repo, dist/lib/ when built).

import { readFileSync } from 'node:fs';
import * as path from 'node:path';

let cached: string | null = null;

export function packageVersion(): string {
  if (cached !== null) return cached;
  cached = 'unknown';
  for (let dir = __dirname, i = 0; i < 4; i++, dir = path.dirname(dir)) {
    try {
      const j = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (j.name === 'nbdmirror' && typeof j.version === 'string') {
        cached = j.version;
        break;
      }
    } catch {
      // not here: look one level up
    }
  }
  return cached;
}
