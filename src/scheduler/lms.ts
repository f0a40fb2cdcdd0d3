/**
 * Linear multistep (k-diffusion `sample_lms`, order 4): x' = x + sum_j c_j d_{i-j}, where c_j integrates over
 * [sigma_i, sigma_{i+1}] the Lagrange basis polynomial of the last `order` sigmas that is 1 at sigma_{i-j}.
 * The first steps use as many past slopes as there are. The integrand is a polynomial of degree < 4, so
 * 4-point Gauss-Legendre quadrature gives it exactly (k-diffusion uses scipy.integrate.quad).
 */
import * as tf from '../backend/tf.js';
import { StepHistory } from './common.js';
import { SigmaSampler } from './k-diffusion.js';
import type { EpsFn, NoiseFn } from './types.js';

const LMS_ORDER = 4;

// 4-point Gauss-Legendre on [-1, 1]: exact for polynomials of degree <= 7.
const GL_NODES = [-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526];
const GL_WEIGHTS = [0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538];

function integrate(f: (x: number) => number, a: number, b: number): number {
  const half = (b - a) / 2;
  const mid = (a + b) / 2;
  return half * GL_NODES.reduce((sum, node, k) => sum + GL_WEIGHTS[k] * f(mid + half * node), 0);
}

/** k-diffusion `linear_multistep_coeff(order, t, i, j)`. */
export function lmsCoefficient(order: number, sigmas: ArrayLike<number>, i: number, j: number): number {
  const basis = (tau: number): number => {
    let prod = 1;
    for (let k = 0; k < order; k++) {
      if (k !== j) prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]);
    }
    return prod;
  };
  return integrate(basis, sigmas[i], sigmas[i + 1]);
}

export class LmsSampler extends SigmaSampler {
  private readonly slopes = new StepHistory('lms', LMS_ORDER);

  protected advance(i: number, x: tf.Tensor4D, eps: EpsFn, _noise: NoiseFn): tf.Tensor4D {
    this.slopes.begin(i, this.totalSteps);
    const order = Math.min(i + 1, LMS_ORDER);
    const next = tf.tidy((): tf.Tensor4D => {
      this.slopes.push(this.epsAt(eps, x, i));
      let sum = x;
      for (let j = 0; j < order; j++) {
        sum = tf.add(sum, tf.mul(this.slopes.recent(j), lmsCoefficient(order, this.sigmas, i, j)));
      }
      return sum;
    });
    if (i === this.totalSteps - 1) this.slopes.dispose();
    return next;
  }

  override dispose(): void {
    this.slopes.dispose();
  }
}
