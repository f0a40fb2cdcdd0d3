/**
 * `sd generate --save-steps DIR`: every step's predicted x0 (../scheduler/x0.ts), decoded by the full VAE, written as
 * DIR/step_001.png, step_002.png, ... (image i of a batch of several: image<i>_step_001.png, i from 1), so a learner
 * watches the image come out of the noise: the early steps are a blurry average, the late ones add the detail.
 * Each costs one VAE decode, about as much as a step or more.
 */
import { mkdirSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { encodePng } from '../image/codec.js';
import type { GenerateOptions, StepPreview } from '../pipeline/api.js';

export function stepFileName(p: StepPreview, batch: number): string {
  const perImage = Math.max(1, Math.round(p.total / batch));
  const step = String(((p.step - 1) % perImage) + 1).padStart(3, '0');
  return batch > 1 ? `image${p.image + 1}_step_${step}.png` : `step_${step}.png`;
}

/** The generate() options that write the steps into `dir` (created); {} when no folder is given. */
export function saveStepsOptions(dir: string | undefined, batch: number): Pick<GenerateOptions, 'preview' | 'onPreview'> {
  if (dir === undefined) return {};
  mkdirSync(dir, { recursive: true });
  return {
    preview: { decoder: 'vae', every: 1 },
    onPreview: async (p) => {
      await writeFile(path.join(dir, stepFileName(p, batch)), await encodePng({ rgb: p.rgb, width: p.width, height: p.height }));
    },
  };
}
