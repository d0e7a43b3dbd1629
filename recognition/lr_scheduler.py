"""Learning-rate schedule: linear warmup, then step (MultiFactor) or polynomial decay.

The schedule is a pure function of the global step, so a resumed run needs nothing but the step. ``step`` is
the number of updates already made (0 for the first one) and ``lr(step)`` equals what MXNet's
``MultiFactorScheduler`` / ``PolyScheduler`` (warmup from 0, linear) give for ``num_update = step + 1``:

    warmup (step + 1 < W):  base_lr * (step + 1) / W              (never 0: the first update uses base_lr / W)
    "step":                 base_lr * factor ** #{milestones m : step >= m}
    "poly":                 base_lr * (1 - (step + 1 - W) / (T - W)) ** power,   0 from step T - 1 on

with W = warmup_steps and T = total_steps. ``build_schedule`` scales the base rate linearly to the global batch
(Goyal et al.): ``cfg.lr * batch_size * world_size / cfg.lr_batch_reference``, so the preset's rate, given for
``lr_batch_reference`` samples per step, carries over to any number of ranks; epochs are converted to steps.
"""


class LRSchedule:
    """``lr = schedule(step)``; see the module docstring for the formula."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, mode="step", step_milestones=(), factor=0.1,
                 power=2.0):
        if mode not in ("step", "poly"):
            raise ValueError("lr mode must be 'step' or 'poly', got %r" % (mode,))
        if base_lr <= 0 or total_steps < 1 or warmup_steps < 0:
            raise ValueError("need base_lr > 0, total_steps >= 1, warmup_steps >= 0; got %r, %r, %r"
                             % (base_lr, total_steps, warmup_steps))
        if mode == "poly" and warmup_steps >= total_steps:
            raise ValueError("poly schedule: warmup_steps (%d) must be fewer than total_steps (%d)"
                             % (warmup_steps, total_steps))
        milestones = tuple(int(m) for m in step_milestones)
        if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ValueError("step milestones must be increasing steps >= 1, got %r" % (milestones,))
        self.base_lr, self.total_steps, self.warmup_steps = float(base_lr), int(total_steps), int(warmup_steps)
        self.mode, self.factor, self.power = mode, float(factor), float(power)
        self.step_milestones = milestones

    def __call__(self, step):
        update = step + 1                   # MXNet's 1-based num_update
        if update < self.warmup_steps:
            return self.base_lr * update / self.warmup_steps
        if self.mode == "step":
            passed = sum(1 for m in self.step_milestones if step >= m)
            return self.base_lr * self.factor ** passed
        progress = min(1.0, (update - self.warmup_steps) / float(self.total_steps - self.warmup_steps))
        return self.base_lr * (1.0 - progress) ** self.power

    def state_dict(self):
        """The settings, for the checkpoint (see ``mismatches``)."""
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "mode": self.mode, "step_milestones": list(self.step_milestones), "factor": self.factor,
                "power": self.power}

    def mismatches(self, saved):
        """Settings that differ from a checkpoint's ``state_dict()``, as 'key: saved -> now' strings (empty when
        the resumed run continues the same schedule)."""
        now = self.state_dict()
        return ["%s: %r -> %r" % (k, saved.get(k), v) for k, v in sorted(now.items()) if saved.get(k) != v]


def build_schedule(cfg, steps_per_epoch, world_size):
    """The schedule of a run: ``cfg.lr`` scaled to the global batch, epochs (num_epochs, warmup_epochs, lr_steps)
    converted to steps. ``cfg.max_steps`` does not change it: it only stops a run early, so a run cut short (or
    interrupted and resumed) follows exactly the curve of the full run."""
    if steps_per_epoch < 1 or world_size < 1:
        raise ValueError("need steps_per_epoch >= 1 and world_size >= 1, got %r, %r" % (steps_per_epoch, world_size))
    global_batch = cfg.batch_size * world_size
    base_lr = cfg.lr * global_batch / float(cfg.lr_batch_reference)
    total = max(1, int(cfg.num_epochs * steps_per_epoch))
    milestones = [int(round(e * steps_per_epoch)) for e in cfg.lr_steps] if cfg.lr_mode == "step" else []
    if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise ValueError("lr_steps %r (epochs) at %d steps per epoch give the milestones %r; they must be "
                         "distinct steps >= 1" % (tuple(cfg.lr_steps), steps_per_epoch, milestones))
    return LRSchedule(base_lr, total, warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                      mode=cfg.lr_mode, step_milestones=milestones, factor=cfg.lr_factor, power=cfg.lr_power)
