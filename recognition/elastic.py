"""Elastic training: ``train.py --elastic`` under horovodrun's elastic driver goes on after a lost rank, and grows
when the discovery script lists another host, without a restart from disk.

    horovodrun --gloo --min-np 2 --max-np 4 --host-discovery-script ./hosts.sh \\
        python recognition/train.py --dataset glint360k --elastic --commit-every 100

Horovod 0.28.1 has no elastic module for MXNet; this one reuses its framework-independent parts
(``horovod.common.elastic``: ``State``, ``run_fn`` and the notification of host changes). docs/elastic.md holds
the findings it rests on. How a run goes:

* Every ``--commit-every`` steps the ranks *commit*: each copies its whole state into host memory
  (``Trainer.snapshot``: the step, hence both loaders' positions; the backbone, its optimizer state, the loss
  scale; the method's state) and sends a copy of its row-sharded part (Partial FC's centres and momentum) to a rank
  on another host (``elastic_rows``). One allreduce that every rank reads ends the commit.
* A lost rank makes the others' collectives fail: MXNet raises ``MXNetError`` ("Horovod has been shut down ...")
  at the first blocking read. The training function turns it into Horovod's ``HorovodInternalError``; ``run_fn``
  then resets Horovod (``hvd.shutdown()``, ``hvd.init()``: the driver gives the new world) and calls the training
  function again.
* Every (re)start builds a new ``Trainer`` for the world it finds (readers, backbone and optimizer, head sized
  for it) and gives it the last commit: the ranks agree on the newest commit they all hold, the holder of its
  shared part broadcasts it to the ranks that lack it (new workers), and the committed rows are re-sharded from the
  survivors' shards and copies. After a failure any array written since the commit may be garbage without an
  error (docs/elastic.md 4.3), so all of it is replaced. The restart then commits at once, in the new layout.
* A host added by the discovery script is announced to rank 0. The next commit's allreduce carries the news to
  every rank, which all raise ``HostsUpdatedInterrupt`` at that step; the job restarts on the larger world from
  that commit. A new worker gets everything from the others.

A commit is kept until the next one has reached every rank: a rank that fails before the closing allreduce keeps
its previous commit beside the new one, so the survivors always share one (the newest any of them closed).
"""
import logging
import os
import pickle

import numpy as np
import mxnet as mx
from horovod.common.elastic import State, notification_manager, run_fn
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from recognition import dist, elastic_rows
from recognition.trainer import Trainer

log = logging.getLogger("recognition.train")

# what a collective says when it failed because a rank was lost (docs/elastic.md 4.1)
LOST_RANK = ("Horovod has been shut down", "gloo", "Connection reset by peer", "Connection closed by peer")
BROADCAST_CHUNK = 1 << 28       # bytes per broadcast of a commit's shared part (an MXNet array: < 2^31 elements)


class CommitLost(RuntimeError):
    """The last commit cannot be put together again: some rows were only on ranks that were lost."""


def check_launcher(elastic, environ=None):
    """``--elastic`` (``elastic``) if and only if horovodrun's elastic driver started this process (it sets
    HOROVOD_ELASTIC=1); ValueError otherwise."""
    driver = (environ if environ is not None else os.environ).get("HOROVOD_ELASTIC") == "1"
    if elastic and not driver:
        raise ValueError("--elastic runs under horovodrun's elastic driver (horovodrun --min-np N --max-np M "
                         "--host-discovery-script S ... python recognition/train.py --elastic ...), which sets "
                         "HOROVOD_ELASTIC=1; it is not set here: drop --elastic, or launch that way")
    if driver and not elastic:
        raise ValueError("horovodrun's elastic driver started this run (HOROVOD_ELASTIC=1: --min-np / --max-np / "
                         "--host-discovery-script): pass --elastic, or launch with -np N -H ... instead")


def lost_rank(error):
    """True when ``error`` (or what caused it) is MXNet reporting a collective that failed with a lost rank."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, mx.base.MXNetError) and any(sign in str(error) for sign in LOST_RANK):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class Commit:
    """One committed state of this rank: the step, the part every rank shares, and the row pieces it holds,
    [(kind, start, end, {name: array})] with kind 'own' (its rows) or 'copy' (a copy it keeps for another rank)."""

    def __init__(self, step, shared, pieces):
        self.step, self.shared, self.pieces = int(step), shared, pieces


class ElasticState(State):
    """The commits of this rank and the training function ``run_fn`` drives (see the module docstring)."""

    def __init__(self, cfg, on_new_world=None):
        super().__init__(bcast_object=None, get_rank=dist.rank)
        self.cfg = cfg
        self.on_new_world = on_new_world      # called after every hvd.init() of a reset (e.g. to relabel the log)
        self.committed = self.pending = None
        self.trainer = None
        self.ranges = self.keepers = None     # every rank's rows and the keeper of its copy, in this world
        self.reached = 0                      # the furthest step this process trained (what a restart redoes)
        self._agreed = False                  # the last commit's closing allreduce returned

    # --------------------------------------------------------------------------- Horovod's State interface
    def restore(self):
        """Nothing to undo here: every (re)start of the training function builds everything from the commit."""

    def sync(self):
        """Nothing: the training function installs the commit, where a failure is recoverable like any other
        (``run_fn`` skips ``sync`` after a removal of hosts, but the rows must be re-sharded then too)."""

    def save(self):
        """The state after this step as the pending commit: a host copy of everything (``Trainer.snapshot``),
        and the copies of other ranks' rows this rank keeps."""
        mx.nd.waitall()     # a collective that failed since the last commit raises here, before anything is copied
        snapshot = self.trainer.snapshot()
        lo, hi = self.ranges[dist.rank()]
        pieces = [("own", lo, hi, snapshot.rows)] if hi > lo else []
        transfers = [(r, k, a, b) for r, ((a, b), k) in enumerate(zip(self.ranges, self.keepers)) if b > a and k != r]
        if transfers:
            kept = elastic_rows.exchange(transfers, [p[1:] for p in pieces], elastic_rows.layout_of(snapshot.rows),
                                         "elastic.copies")
            pieces += [("copy", a, b, rows) for a, b, rows in kept]
        self.pending = Commit(self.trainer.step, snapshot.shared, pieces)

    def commit(self):
        """Save, then the allreduce every rank reads: once it returns, every rank holds this commit, and the older
        one is dropped. Raises ``HostsUpdatedInterrupt`` on every rank alike when rank 0 heard of a host change."""
        self.save()
        self._agreed = False
        try:
            self.check_host_updates()
        finally:
            if self._agreed:
                self.committed, self.pending = self.pending, None

    def check_host_updates(self):
        """Horovod's check, with an allreduce (max) in place of its broadcast from rank 0: it closes the commit
        (the root of a broadcast does not wait for the others) and needs no rank to have heard of the change."""
        self._agreed = False
        previous = last = self._last_updated_timestamp
        update = 0
        while not self._host_messages.empty():
            timestamp, result = self._host_messages.get()
            if timestamp > last:
                last, update = timestamp, update | int(result)
        agreed = dist.allreduce(np.array([previous, last, update & 1, update >> 1 & 1], np.float64),
                                name="elastic.commit", op="max")
        self._agreed = True         # every rank has reached this allreduce: every rank saved this commit
        previous, self._last_updated_timestamp = float(agreed[0]), float(agreed[1])
        if self._last_updated_timestamp > previous:
            raise HostsUpdatedInterrupt(bool(agreed[2]) and not agreed[3])

    # ------------------------------------------------------------------------------------ a (re)start
    def train(self, _state=None):
        """The training function ``run_fn`` calls: a lost rank's failure becomes ``HorovodInternalError``."""
        try:
            return self._train()
        except (HorovodInternalError, HostsUpdatedInterrupt):
            raise
        except Exception as err:        # noqa: BLE001 - sorted into a lost rank (recovered) or anything else
            if lost_rank(err):
                raise HorovodInternalError("a rank was lost: %s" % str(err).strip().splitlines()[0]) from err
            raise

    def _train(self):
        cfg = self.cfg
        holdings = dist.allgather_object(self._holdings(), "elastic.holdings")
        step, root = _newest_common(holdings)
        self.trainer = trainer = Trainer(cfg, claim_output=step is None)
        try:
            self._new_world(trainer, holdings)
            if step is None:
                if cfg.resume:
                    trainer.resume()
                if dist.rank() == 0:
                    log.info("elastic: %d rank(s) start at step %d; a commit every %d steps", dist.size(),
                             trainer.step, cfg.commit_every)
            else:
                self._install(trainer, holdings, step, root)
            self.commit()
            loss = trainer.fit(after_step=self._after_step)
            dist.barrier("elastic.end")     # every rank finishes together: one leaving ends the job (docs 4.5.5)
            return loss
        finally:
            self.reached = max(self.reached, trainer.step)
            trainer.close()
            self.trainer = None

    def _after_step(self, trainer):
        if trainer.step % self.cfg.commit_every == 0:
            self.commit()

    def _holdings(self):
        """What this rank holds, for the agreement at a (re)start."""
        commits = [c for c in (self.committed, self.pending) if c is not None]
        layout = next((elastic_rows.layout_of(rows) for c in commits for *_, rows in c.pieces), None)
        return {"committed": self.committed.step if self.committed else None, "steps": [c.step for c in commits],
                "pieces": [(c.step, kind, lo, hi) for c in commits for kind, lo, hi, _ in c.pieces],
                "layout": layout, "reached": self.reached, "host": dist.host_name()}

    def _new_world(self, trainer, holdings):
        """Every rank's rows in this world and the keeper of each one's copy."""
        self.ranges = [tuple(r) for r in dist.allgather_object(trainer.method.shard_rows(), "elastic.ranges")]
        if len({hi > lo for lo, hi in self.ranges}) > 1:
            raise ValueError("elastic: the %s method shards rows on some ranks only (%s); every rank must hold "
                             "some or none" % (self.cfg.method, self.ranges))
        self.keepers = elastic_rows.keepers([h["host"] for h in holdings])

    def _install(self, trainer, holdings, step, root):
        """Give the new trainer the commit of ``step``: the shared part from ``root``, this rank's rows from their
        holders."""
        mine = [c for c in (self.committed, self.pending) if c is not None and c.step == step]
        if any(h["steps"] and step not in h["steps"] for h in holdings):
            raise RuntimeError("elastic: ranks disagree on the commits they hold: %s" % [h["steps"] for h in holdings])
        # every live rank holds this commit: it is this rank's commit now, older ones go
        self.committed = Commit(step, mine[0].shared, [p for c in mine for p in c.pieces]) if mine else None
        self.pending = None
        shared = mine[0].shared if mine else None
        if not all(step in h["steps"] for h in holdings):
            shared = broadcast_object(shared, root, "elastic.shared")
        rows = {}
        if self.ranges[0][1] > self.ranges[0][0]:
            pieces = sorted(((kind != "own", r), lo, hi) for r, h in enumerate(holdings)
                            for s, kind, lo, hi in h["pieces"] if s == step)
            try:
                transfers = elastic_rows.plan_transfers([(r, lo, hi) for (_, r), lo, hi in pieces], self.ranges)
            except elastic_rows.MissingRows as err:
                raise CommitLost(
                    "elastic: the commit of step %d cannot be restored on these %d ranks: the %s rows %s were held "
                    "only by ranks that are gone (a rank and the keeper of its copy, on another host, were lost "
                    "together). Restart from the last checkpoint: horovodrun ... python recognition/train.py ... "
                    "--resume" % (step, dist.size(), self.cfg.method, ", ".join("[%d, %d)" % g for g in err.gaps)))
            layout = next(h["layout"] for h in holdings if h["layout"])
            held = [(lo, hi, piece_rows) for c in mine for _, lo, hi, piece_rows in c.pieces]
            got = elastic_rows.exchange(transfers, held, layout, "elastic.reshard")
            rows = {name: np.concatenate([r[name] for _, _, r in got]) for name, _, _ in layout}
        trainer.load_snapshot(shared, rows)
        if dist.rank() == 0:
            reached = max(h["reached"] for h in holdings)
            again = ("; step %d is trained again" % reached if reached == step + 1 else
                     "; steps %d-%d are trained again" % (step + 1, reached) if reached > step else "")
            log.warning("elastic: %d rank(s) on %d host(s) continue from the commit of step %d (%s)%s", dist.size(),
                        len({h["host"] for h in holdings}), step, _position(trainer.method.position(step)), again)

    # ------------------------------------------------------------------------------------- after a failure
    def reset_world(self):
        """``run_fn``'s reset: drain MXNet's engine (a failed op raises once, docs 4.3), shut Horovod down and
        initialise it again: ``hvd.init()`` returns when the driver has formed the new world."""
        import horovod.mxnet as hvd
        for _ in range(8):
            try:
                mx.nd.waitall()
                break
            except mx.base.MXNetError:
                continue
        hvd.shutdown()
        hvd.init()
        if self.on_new_world is not None:
            self.on_new_world()


def _newest_common(holdings):
    """(step, root) of the commit to restart from: the newest that some rank closed (every live rank holds it, as
    its commit or its pending one), and the lowest rank holding its shared part; (None, None) before any."""
    closed = [h["committed"] for h in holdings if h["committed"] is not None]
    if not closed:
        return None, None
    step = max(closed)
    return step, min(r for r, h in enumerate(holdings) if step in h["steps"])


def _position(position):
    return ", ".join("%s %s" % (k.replace("_", " "), v) for k, v in sorted(position.items()))


def broadcast_object(obj, root, name):
    """``obj`` of rank ``root`` on every rank, pickled, in chunks (every rank reads every chunk: none returns
    before all have it, which ``horovod.mxnet.broadcast_object`` does not ensure on the root)."""
    if dist.size() == 1:
        return obj
    blob = pickle.dumps(obj, protocol=4) if dist.rank() == root else b""
    length = int(dist.broadcast(np.array([len(blob)], np.int64), name=name + ".length", root=root)[0])
    out = bytearray(length)
    for lo in range(0, length, BROADCAST_CHUNK):
        hi = min(lo + BROADCAST_CHUNK, length)
        part = np.frombuffer(blob, np.uint8, hi - lo, lo) if blob else np.zeros(hi - lo, np.uint8)
        out[lo:hi] = dist.broadcast(part, name="%s.%d" % (name, lo // BROADCAST_CHUNK), root=root).tobytes()
    return obj if dist.rank() == root else pickle.loads(bytes(out))


def run(cfg, on_new_world=None):
    """Train ``cfg`` elastically (Horovod initialised by the caller under horovodrun's elastic driver); returns the
    last loss. ``on_new_world()`` runs after Horovod re-initialised on a new world."""
    state = ElasticState(cfg, on_new_world)
    try:
        return run_fn(state.train, state.reset_world)(state)
    finally:
        service = getattr(notification_manager, "_service", None)
        if service is not None:     # the thread run_fn started to hear of host changes: nothing more will come
            service.shutdown()
            notification_manager._service = None
