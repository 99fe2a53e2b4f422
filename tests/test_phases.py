"""Nothing lost when any phase of a step fails (issue 20, item 1).

"An exception in any phase (a pass, a backend, the update, a collective) returns the
parameters to x_t and the state to its pre-step values, bitwise. The phase then allows the
next step."

A fault is injected at every phase boundary, for SASSHA and MSASSHA, the closure interface
(``opt.step(closure)``) and the official protocol, autograd and finite-difference HVPs, and
every backend:

* in the closure's passes: the first pass, SASSHA's second (perturbed) pass, the first
  finite-difference pass;
* in a backend (``FaultyBackend`` wraps the real one, given by ``backend=``, and raises on the
  first call of a phase, before delegating, so nothing of that call is written): ``sq_norm``,
  ``perturb``, ``probes`` (autograd refresh), ``fd_move`` / ``fd_fold`` (finite differences),
  ``restore`` (SASSHA's ``unperturb()``, which reads the finite check on plain steps),
  ``update``; and the first ``sq_norm`` after ``perturb`` (SASSHA: while the params are
  perturbed) or after ``update`` (M-SASSHA: the momentum norm of the re-perturbation);
* in the user's own code in the protocol: between ``perturb_weights()`` and ``unperturb()``,
  inside the ``hvp_passes()`` loop, after ``unperturb()`` / before ``step()``.

M-SASSHA's re-perturbation (``perturb`` and the ``sq_norm`` after ``update``) runs after the
update has committed: a fault there leaves the step taken with the params at x_{t+1}, and
``zero_grad()`` perturbs them (see ``committed``); undoing a committed update would need a copy
of the whole optimizer state.

Each run faults at step 1 (no state yet), at step 2 (between refreshes) and at step 3 (a
refresh, ``lazy_hessian=2``); a fault that needs a refresh only at steps 1 and 3. After each
fault: the params are where the step found them (SASSHA: x_t; M-SASSHA: x~_t, or x_1 at the
first step), every state tensor, the global step and the optimizer-wide counters are bitwise as
before, SASSHA is not perturbed. For the protocol the user then calls ``opt.zero_grad()``,
which ends a step under way (for faults inside the optimizer the check runs before that call
too). Then the step is taken again on the same batch, and every following step is compared,
params and every state entry, bitwise with a twin run that never had a fault (the same backend
wrapper, never armed). Schedules for ``hessian_power`` and ``rho`` run too, so a faulted step
that advanced them shows. Collectives need a process group and are covered by
``test_distributed``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch

from conftest import device_for, every_backend, requires_cpp
from parity import coupled_loss
from sassha_fused import MSASSHA, SASSHA, get_backend
from sassha_fused.backends import Backend
from sassha_fused.schedules import LinearSchedule

pytestmark = pytest.mark.filterwarnings("ignore:.*create_graph=True.*:UserWarning")

SHAPES = ((7,), (3, 5), (40,))
EXTRA = "sassha_fused"


class InjectedFault(RuntimeError):
    """The exception the tests inject; nothing else raises it."""


# ----------------------------------------------------------------- the fault wrapper
class FaultyBackend(Backend):
    """A real backend that raises ``InjectedFault`` on the first call of one phase once armed.

    ``arm(method, after=None)``: the first call of ``method`` (after a call of ``after``, when
    given) raises before it reaches the real backend; one fault per ``arm``.
    """

    PHASES = ("sq_norm", "perturb", "probes", "fd_move", "fd_fold", "restore", "update")

    def __init__(self, name: str) -> None:
        self.inner = get_backend(name)
        self.name = f"faulty({name})"
        self.armed: Optional[Tuple[str, Optional[str]]] = None
        self.fired = False
        self._seen: set = set()

    def arm(self, method: str, after: Optional[str] = None) -> None:
        assert method in self.PHASES
        self.armed, self.fired, self._seen = (method, after), False, set()

    def disarm(self) -> None:
        self.armed = None

    def _call(self, method: str, *args, **kwargs):
        if self.armed is not None:
            want, after = self.armed
            if method == want and (after is None or after in self._seen):
                self.armed, self.fired = None, True
                raise InjectedFault(f"injected fault in {self.inner.name}.{method}")
            self._seen.add(method)
        return getattr(self.inner, method)(*args, **kwargs)

    def supports(self, device, dtype):
        return self.inner.supports(device, dtype)

    def accepts(self, tensor):
        return self.inner.accepts(tensor)


for _phase in FaultyBackend.PHASES:  # each phase goes through _call
    setattr(FaultyBackend, _phase, lambda self, *args, _phase=_phase, **kwargs: self._call(_phase, *args, **kwargs))


# -------------------------------------------------------------------- the fault table
@dataclass(frozen=True)
class Fault:
    cls: type
    interface: str  # "closure" | "protocol"
    hvp: str  # "autograd" | "finite_difference"
    kind: str  # "backend" | "pass" | "user"
    where: str  # backend phase, closure pass number ("1", "2", "fd"), or the user's code point
    after: Optional[str] = None  # backend faults: the first call after this phase
    refresh_only: bool = False
    opts: Tuple[Tuple[str, object], ...] = field(default=())

    @property
    def id(self) -> str:
        hvp = "autograd" if self.hvp == "autograd" else "fd"
        where = {"backend": f"backend.{self.where}" + (f"-after-{self.after}" if self.after else ""),
                 "pass": f"closure-pass-{self.where}", "user": f"user-{self.where}"}[self.kind]
        extra = "".join(f"-{k}" for k, v in self.opts if v is True)
        return f"{self.cls.__name__}-{self.interface}-{hvp}-{where}{extra}"


def _table():
    rows = []
    for cls in (SASSHA, MSASSHA):
        for interface in ("closure", "protocol"):
            for hvp in ("autograd", "finite_difference"):
                fd = hvp == "finite_difference"

                def add(kind, where, after=None, refresh_only=False, opts=()):
                    rows.append(Fault(cls, interface, hvp, kind, where, after, refresh_only, tuple(opts)))

                add("backend", "sq_norm")
                add("backend", "perturb")
                # SASSHA's protocol: unperturb() reads the finite check as it restores on plain steps,
                # so the first sq_norm after perturb is the check of a refresh step
                add("backend", "sq_norm", after="perturb" if cls is SASSHA else "update",
                    refresh_only=cls is SASSHA and interface == "protocol")
                add("backend", "fd_move" if fd else "probes", refresh_only=True)
                if fd and interface == "protocol":
                    add("backend", "fd_fold", refresh_only=True)
                add("backend", "update")
                if interface == "closure":
                    add("pass", "1")
                    if cls is SASSHA:
                        add("pass", "2")
                    if fd:
                        add("pass", "fd", refresh_only=True)
                elif cls is SASSHA:
                    add("user", "perturbed-forward")
                    add("user", "after-second-backward")
                    if fd:
                        add("user", "in-hvp-loop", refresh_only=True)
                    add("user", "after-unperturb")
                    add("backend", "restore")  # unperturb()'s restore (with the finite check on plain steps)
                    # the restore fused into the update (defer_unperturb): still back to x_t
                    add("backend", "update", opts=(("defer_unperturb", True),))
                    add("user", "after-unperturb", opts=(("defer_unperturb", True),))
                else:
                    add("user", "after-backward")
                    if fd:
                        add("user", "in-hvp-loop", refresh_only=True)
                    add("user", "before-step")
    return rows


# The interpreted Triton kernels and the C++ extension (0.05-0.25 s a step here) run the rows
# whose phase reaches their own code or restores around it; the wrapper raises before any backend
# code runs, so what follows a fault is the optimizer's own, and eager/foreach run every row.
_SLOW_ROWS = {"cpp": lambda r: r.kind == "backend" and r.after is None and r.where != "sq_norm"}
if os.environ.get("TRITON_INTERPRET") == "1":
    _SLOW_ROWS["triton"] = lambda r: r.kind == "backend" and (r.where == "update" or (
        r.interface == "closure" and r.where in ("fd_move", "probes")))


def _cases():
    out = []
    for row in _table():
        for b in every_backend():
            name = b.values[0]
            if name in _SLOW_ROWS and not _SLOW_ROWS[name](row):
                continue
            out.append(pytest.param(row, name, id=f"{row.id}-{name}", marks=b.marks))
    return out


# ------------------------------------------------------------------ driving a step
def make_run(row: Fault, backend: str):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, torch.float32))
              for s in SHAPES]
    wrapper = FaultyBackend(backend)
    opt = row.cls(params, lr=0.05, weight_decay=0.01, lazy_hessian=2, seed=5, backend=wrapper, hvp=row.hvp,
                  hessian_power=LinearSchedule(0.5, 0.8, 8), rho=LinearSchedule(0.05, 0.1, 8), **dict(row.opts))
    return params, opt, wrapper


def run_step(opt, params, t: int, interface: str, fault: Optional[Fault] = None):
    """One step on batch ``t``; ``fault`` (a pass or user fault) raises at its point."""
    loss_fn = lambda: coupled_loss(params, t)  # noqa: E731

    if interface == "closure":
        calls = [0]
        fd_pass = 3 if isinstance(opt, SASSHA) else 2

        def closure():
            calls[0] += 1
            if fault is not None and fault.kind == "pass":
                n = fd_pass if fault.where == "fd" else int(fault.where)
                if calls[0] == n:
                    raise InjectedFault(f"injected fault in closure pass {n}")
            return loss_fn()

        return opt.step(closure)

    def user(point):
        if fault is not None and fault.kind == "user" and fault.where == point:
            raise InjectedFault(f"injected fault in the user's code: {point}")

    if isinstance(opt, SASSHA):
        loss_fn().backward()
        opt.perturb_weights(zero_grad=True)
        user("perturbed-forward")
        loss_fn().backward(create_graph=opt.hessian_due)
        user("after-second-backward")
        for _ in opt.hvp_passes():
            user("in-hvp-loop")
            loss_fn().backward()
        opt.unperturb()
        user("after-unperturb")
    else:
        loss_fn().backward(create_graph=opt.hessian_due)
        user("after-backward")
        for _ in opt.hvp_passes():
            user("in-hvp-loop")
            loss_fn().backward()
        user("before-step")
    opt.step()
    opt.zero_grad()


# ------------------------------------------------------------- snapshots and the twin
def snapshot(opt, params, extra: bool = True) -> Dict:
    state = []
    for p in params:
        entry = opt.state[p] if p in opt.state else {}
        state.append({k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in entry.items()})
    snap = {"params": [p.detach().clone() for p in params], "state": state, "global_step": opt.global_step,
            "is_perturbed": opt.is_perturbed}
    if extra:  # only between steps: state_dict() is a call of its own
        snap["extra"] = copy.deepcopy(opt.state_dict()[EXTRA])
    return snap


def assert_pristine(state: Dict, param: torch.Tensor, what: str) -> None:
    """State a faulted first step may leave for a param that had none: as a refresh would
    find it (SPEC section 7, as for a skipped step): counters 0, moments 0, x_t itself."""
    for key, value in state.items():
        if key == "unperturbed_param":
            assert torch.equal(value, param), f"{what}: new state {key!r} is not the param"
        else:
            assert not torch.as_tensor(value).any(), f"{what}: new state {key!r} is not zero"


def assert_same(got: Dict, want: Dict, what: str, pristine_ok: bool = False) -> None:
    assert got["global_step"] == want["global_step"], (
        f"{what}: global_step {got['global_step']} != {want['global_step']}")
    assert got["is_perturbed"] == want["is_perturbed"], (
        f"{what}: is_perturbed {got['is_perturbed']} != {want['is_perturbed']}")
    for k, (a, b) in enumerate(zip(got["params"], want["params"])):
        assert torch.equal(a, b), f"{what}: param {k} differs (max |diff| {(a - b).abs().max().item():.3g})"
    for k, (s, r) in enumerate(zip(got["state"], want["state"])):
        if not r and s and pristine_ok:
            assert_pristine(s, got["params"][k], f"{what}: param {k}")
            continue
        assert set(s) == set(r), f"{what}: param {k} state keys {sorted(s)} != {sorted(r)}"
        for key in s:
            if torch.is_tensor(r[key]):
                assert s[key].dtype == r[key].dtype and torch.equal(s[key], r[key]), (
                    f"{what}: param {k} state {key!r} differs")
            else:
                assert s[key] == r[key], f"{what}: param {k} state {key!r}: {s[key]} != {r[key]}"
    if "extra" in got and "extra" in want:
        diff = sorted(k for k in set(got["extra"]) | set(want["extra"]) if got["extra"].get(k) != want["extra"].get(k))
        assert not diff, (f"{what}: state_dict()['{EXTRA}'] differs in {diff}: "
                          f"{[got['extra'].get(k) for k in diff]} != {[want['extra'].get(k) for k in diff]}")


_TWINS: Dict[tuple, list] = {}


def twin_trajectory(row: Fault, backend: str, steps: int) -> list:
    """Snapshots after 0..steps steps of a run that never had a fault (cached per configuration)."""
    key = (row.cls, row.interface, row.hvp, row.opts, backend, steps)
    if key not in _TWINS:
        params, opt, _ = make_run(row, backend)
        snaps = [snapshot(opt, params)]
        for t in range(1, steps + 1):
            run_step(opt, params, t, row.interface)
            snaps.append(snapshot(opt, params))
        _TWINS[key] = snaps
    return _TWINS[key]


def _caused_by_fault(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InjectedFault):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def committed(row: Fault) -> bool:
    """M-SASSHA's re-perturbation runs after the update has committed: a fault there leaves the
    step taken, the params at x_{t+1} unperturbed (``is_perturbed`` False), and ``zero_grad()``
    (or the next ``step(closure)``) perturbs them; the run then goes on from step t + 1."""
    return row.cls is MSASSHA and row.kind == "backend" and (row.where == "perturb" or row.after == "update")


def fault_step(opt, params, wrapper: FaultyBackend, row: Fault, t: int, before: Dict, after: Dict) -> bool:
    """Take step ``t`` with the fault armed; check that it raised and left nothing behind
    (or, for a fault after the commit, the step taken). Returns whether step ``t`` was taken."""
    if row.kind == "backend":
        wrapper.arm(row.where, row.after)
    try:
        run_step(opt, params, t, row.interface, fault=row)
    except Exception as exc:  # noqa: BLE001 (whatever the optimizer made of it)
        assert _caused_by_fault(exc), f"step {t}: the step raised {exc!r}, not the injected fault"
    else:
        if row.kind == "backend" and not wrapper.fired:  # the table names a phase this step never runs
            pytest.fail(f"step {t} made no {row.where} call{' after ' + row.after if row.after else ''}: "
                        "the row tests nothing")
        pytest.fail(f"step {t}: the injected fault was swallowed; the step went on")
    finally:
        wrapper.disarm()
    where = f"after a fault at {row.id.split('-', 3)[-1]} in step {t}"
    if committed(row):
        got = snapshot(opt, params, extra=False)
        assert got["global_step"] == after["global_step"] and not got["is_perturbed"], where
        for k, p in enumerate(params):  # x_{t+1}, which the twin keeps in unperturbed_param
            assert torch.equal(p, after["state"][k]["unperturbed_param"]), f"{where}: param {k} is not x_(t+1)"
        opt.zero_grad()
        assert_same(snapshot(opt, params), after, where + ", then zero_grad()")
        return True
    inside = row.kind != "user"
    if row.interface == "closure" or inside:
        # the optimizer saw the exception: everything is back at once
        assert_same(snapshot(opt, params, extra=False), before, where, pristine_ok=True)
        if row.cls is SASSHA:
            assert not opt.is_perturbed, f"{where}: is_perturbed"
    if row.interface == "protocol":
        opt.zero_grad()  # ends a step under way
    assert_same(snapshot(opt, params), before, where + (", then zero_grad()" if row.interface == "protocol" else ""),
                pristine_ok=True)
    if row.cls is SASSHA:
        assert not opt.is_perturbed, f"{where}: is_perturbed"
    return False


# ------------------------------------------------------------------------- the test
@pytest.mark.parametrize("row,backend", _cases())
def test_fault_leaves_nothing_behind_and_the_run_goes_on(row: Fault, backend: str):
    # steps 1 and 3 refresh (lazy_hessian=2); the interpreted Triton kernels are slow: 3 steps
    steps = 3 if "triton" in _SLOW_ROWS and backend == "triton" else 5
    faults_at = (1, 3) if row.refresh_only else (1, 2, 3)
    twin = twin_trajectory(row, backend, steps)
    params, opt, wrapper = make_run(row, backend)
    assert_same(snapshot(opt, params), twin[0], "before any step")
    for t in range(1, steps + 1):
        taken = t in faults_at and fault_step(opt, params, wrapper, row, t, twin[t - 1], twin[t])
        if not taken:
            run_step(opt, params, t, row.interface)
        assert_same(snapshot(opt, params), twin[t], f"step {t}" + (" (taken again after its fault)"
                                                                  if t in faults_at else ""))


# ----------------------------------------------------- what the second reader found
@requires_cpp
def test_a_later_buckets_failed_update_says_what_was_written():
    """Two buckets (a non-contiguous param goes to the eager fallback, ahead of the faulty
    backend's bucket): the first bucket's update is written before the second fails. That
    cannot be undone without a copy of the state; the error says so, names the bucket, and
    the unwritten bucket's params are back at x_t."""
    from sassha_fused.functional import PartialUpdate

    a = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t())  # not contiguous: the eager fallback
    b = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    wrapper = FaultyBackend("cpp")  # (the C++ kernels take contiguous tensors only)
    opt = SASSHA([a, b], lr=0.1, lazy_hessian=2, backend=wrapper, defer_unperturb=True)

    def loss():
        return ((a - 1) ** 4).sum() + ((b + 1) ** 4).sum()

    opt.step(loss)
    loss().backward()
    b_t = b.detach().clone()
    opt.perturb_weights()
    loss().backward(create_graph=opt.hessian_due)
    opt.unperturb()  # deferred: b still holds x_t + e_t until the update
    wrapper.arm("update")
    with pytest.raises(PartialUpdate, match="bucket 2 of 2.*Load the last checkpoint"):
        opt.step()
    assert torch.equal(b, b_t) and opt.phase.value == "idle" and not opt.is_perturbed


def test_zero_grad_right_after_perturb_weights_keeps_the_step():
    """``perturb_weights(zero_grad=False); opt.zero_grad()`` (a SAM-port habit) clears .grad
    only: the step goes on and equals ``perturb_weights(zero_grad=True)`` bitwise."""
    def run(habit):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
        opt = SASSHA([w], lr=0.1, lazy_hessian=2, backend="eager")
        for _ in range(3):
            ((w - 1) ** 4).sum().backward()
            if habit:
                opt.perturb_weights(zero_grad=False)
                opt.zero_grad()
                assert opt.is_perturbed
            else:
                opt.perturb_weights(zero_grad=True)
            ((w - 1) ** 4).sum().backward(create_graph=opt.hessian_due)
            opt.unperturb()
            opt.step()
            opt.zero_grad()
        return w.detach().clone(), opt.state[w]["exp_hessian_diag"].clone()

    (w1, d1), (w2, d2) = run(True), run(False)
    assert torch.equal(w1, w2) and torch.equal(d1, d2)


def test_zero_grad_inside_unperturbed_ends_the_step_at_x_t():
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = SASSHA([w], lr=0.1, backend="eager")
    ((w - 1) ** 4).sum().backward()
    x_t = w.detach().clone()
    opt.perturb_weights()
    with opt.unperturbed():
        opt.zero_grad()  # ends the step under way
    assert torch.equal(w, x_t) and opt.phase.value == "idle"


def test_nonfinite_raise_leaves_the_schedules_and_the_retry_where_they_were():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    power = LinearSchedule(0.5, 1.0, 10)
    opt = SASSHA([w], lr=0.05, lazy_hessian=3, backend="eager", nonfinite="raise", hessian_power=power)
    poison = [1.0]

    def loss():
        return ((w - 1) ** 4).sum() * poison[0]

    opt.step(loss)
    before = (opt.global_step, power.state_dict(), opt.refresh_due)
    poison[0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step(loss)
    assert (opt.global_step, power.state_dict(), opt.refresh_due) == before
