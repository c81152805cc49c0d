"""A float64 transcription of torch's Adam/AdamW update, rounding what it stores to a dtype.

The fused kernels compute in float32 and round once per stored value; this reference computes in
float64 and rounds the same values, so any difference is float32 arithmetic, not the algorithm.
"""
import torch


class ReferenceAdam:
    """Adam/AdamW on float64 copies of ``params``; ``storage_dtype`` is what params/states hold."""

    def __init__(self, params, storage_dtype, lr, betas, eps, weight_decay, amsgrad, maximize,
                 decoupled, state_dtype=None):
        self.params = [p.detach().to(torch.float64) for p in params]
        self.storage_dtype = storage_dtype
        self.state_dtype = state_dtype or storage_dtype
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad, self.maximize = weight_decay, amsgrad, maximize
        self.decoupled = decoupled
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.max_exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0

    def _store(self, value, dtype=None):
        dtype = dtype or self.storage_dtype
        if dtype.is_complex:
            return value
        return value.to(dtype).to(torch.float64)

    def step(self, grads):
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1 - self.beta1 ** t
        bias_correction2_sqrt = (1 - self.beta2 ** t) ** 0.5
        for i, grad in enumerate(grads):
            p = self.params[i]
            g = grad.detach().to(torch.float64)
            if self.maximize:
                g = -g
            if self.weight_decay != 0:
                if self.decoupled:
                    # torch multiplies by this factor as a float32 scalar (so does every fused
                    # kernel): its rounding shrinks all elements alike, step after step, which
                    # the reference must share to compare float32 arithmetic and not that.
                    scale = torch.tensor(1 - self.lr * self.weight_decay, dtype=torch.float32)
                    p = p * scale.item()
                else:
                    g = g + self.weight_decay * p
            m = self.exp_avg[i] + (1 - self.beta1) * (g - self.exp_avg[i])
            v = self.beta2 * self.exp_avg_sq[i] + (1 - self.beta2) * g * g
            second = v
            if self.amsgrad:
                second = torch.maximum(self.max_exp_avg_sq[i], v)
                self.max_exp_avg_sq[i] = self._store(second, self.state_dtype)
            denom = second.sqrt() / bias_correction2_sqrt + self.eps
            p = p - (self.lr / bias_correction1) * m / denom
            self.params[i] = self._store(p)
            self.exp_avg[i] = self._store(m, self.state_dtype)
            self.exp_avg_sq[i] = self._store(v, self.state_dtype)
