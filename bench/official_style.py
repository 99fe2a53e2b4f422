"""SASSHA written the way the authors' official code is written: the speed baseline.

Written here from a description of that code (not copied): a per-tensor Python loop,
the Hessian estimate kept as a ``p.hess`` attribute and replaced by ``p.hess.abs().clone()``
on every step (refresh or not), the gradient norm taken per tensor of
``(|p| if adaptive else 1.0) * p.grad`` (a product tensor even when not adaptive),
the perturbation ``e_w`` stored per parameter and subtracted again on ``unperturb``
(which rounds: it does not give back ``x_t`` bit for bit),
``exp_hessian_diag ** p / bias_correction2 + eps`` denominators, and ``p.mul_`` /
``p.addcdiv_`` for the update. The training loop that
drives it builds the double-backward graph on every step (``create_graph=True``),
whether or not the step refreshes the Hessian. Used only by ``bench/``; the
project's reference implementation is ``sassha_fused/backends/eager.py``.
"""

from __future__ import annotations

import torch


class OfficialStyleSASSHA(torch.optim.Optimizer):
    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), weight_decay=0.0, rho=0.2,
                 lazy_hessian=10, n_samples=1, eps=1e-4, hessian_power=0.5, seed=0, adaptive=False):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, rho=rho, eps=eps,
                        hessian_power=hessian_power)
        super().__init__(params, defaults)
        self.lazy_hessian = lazy_hessian
        self.n_samples = n_samples
        self.adaptive = adaptive
        self.generator = torch.Generator().manual_seed(seed)
        for p in self.get_params():
            p.hess = 0.0
            self.state[p]["hessian step"] = 0

    def get_params(self):
        return (p for group in self.param_groups for p in group["params"] if p.requires_grad)

    def zero_hessian(self):
        for p in self.get_params():
            if not isinstance(p.hess, float) and self.state[p]["hessian step"] % self.lazy_hessian == 0:
                p.hess.zero_()

    @torch.no_grad()
    def set_hessian(self):
        params = [p for p in self.get_params()
                  if p.grad is not None and self.state[p]["hessian step"] % self.lazy_hessian == 0]
        for p in self.get_params():
            self.state[p]["hessian step"] += 1
        if not params:
            return
        grads = [p.grad for p in params]
        for i in range(self.n_samples):
            zs = [torch.randint(0, 2, p.size(), generator=self.generator).to(p) * 2.0 - 1.0 for p in params]
            with torch.enable_grad():
                h_zs = torch.autograd.grad(grads, params, grad_outputs=zs, only_inputs=True,
                                           retain_graph=i < self.n_samples - 1)
            for h_z, z, p in zip(h_zs, zs, params):
                p.hess += h_z * z / self.n_samples

    @torch.no_grad()
    def perturb_weights(self, zero_grad=True):
        grad_norm = torch.norm(torch.stack([
            ((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2)
            for p in self.get_params() if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                if self.adaptive:
                    e_w *= torch.pow(p, 2)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self):
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    # Through .data, as the official code does: the graph of the second
                    # backward pass still references these params, and a tracked in-place
                    # change would make its Hessian-vector product fail (it is also why
                    # the official HVP reads the restored weights, not x + e).
                    p.data.sub_(self.state[p]["e_w"])

    @torch.no_grad()
    def step(self, closure=None):
        self.zero_hessian()
        self.set_hessian()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or isinstance(p.hess, float):
                    continue
                p.hess = p.hess.abs().clone()  # every step, as the official code does
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_hessian_diag"] = torch.zeros_like(p)
                    state["bias_correction2"] = 0.0
                state["step"] += 1
                exp_avg, exp_hessian_diag = state["exp_avg"], state["exp_hessian_diag"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                bias_correction1 = 1 - beta1 ** state["step"]
                if (state["hessian step"] - 1) % self.lazy_hessian == 0:
                    exp_hessian_diag.mul_(beta2).add_(p.hess, alpha=1 - beta2)
                    state["bias_correction2"] = (1 - beta2 ** state["step"]) ** group["hessian_power"]
                step_size = group["lr"] / bias_correction1
                denom = (exp_hessian_diag ** group["hessian_power"]) / state["bias_correction2"] + group["eps"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
