"""One rank of the multi-process Horovod-API tests (run by the launcher).

Usage: python hvd_worker.py OUT_DIR [CHECK,CHECK,...]

Runs every check in one job and writes OUT_DIR/rank{r}.json: for each check,
the numbers the test asserts on (differences against NumPy or against one
process trained on the whole batches, computed here on rank 0).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_smdist.horovod as hvd  # noqa: E402
import tf_smdist.horovod.keras as hvd_keras  # noqa: E402
import tf_smdist.sdp as sdp  # noqa: E402
import tf_smdist.sdp.keras as sdp_keras  # noqa: E402

OUT = sys.argv[1]
GLOBAL_BATCH = 24  # divisible by 2 and 3
STEPS = 4
LR = 0.1

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
results: dict[str, object] = {"rank": RANK, "size": SIZE}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.randn(GLOBAL_BATCH * STEPS, 5).astype("float32")
    y = (np.tanh(x @ rng.randn(5, 2)) + 0.1 * rng.randn(len(x), 2)).astype("float32")
    return x, y


def shard(a: np.ndarray) -> np.ndarray:
    """This rank's contiguous part of every global batch, batch after batch."""
    local = GLOBAL_BATCH // SIZE
    batches = a.reshape(STEPS, GLOBAL_BATCH, *a.shape[1:])
    return batches[:, RANK * local:(RANK + 1) * local].reshape(-1, *a.shape[1:])


def model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)),
                             keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(2)])


def rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(u - v)) / (np.max(np.abs(v)) + 1e-12))
               for u, v in zip(a, b))


def same_on_every_rank(weights: list[np.ndarray]) -> bool:
    gathered = hvd.allgather_object([np.asarray(w) for w in weights])
    return all(np.array_equal(u, v) for other in gathered
               for u, v in zip(other, gathered[0]))


class Recorder(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.logs: list[dict] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.logs.append({k: float(v) for k, v in (logs or {}).items()})


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(LR, momentum=0.5)


def adamw_excluding_kernels() -> keras.optimizers.Optimizer:
    adamw = keras.optimizers.AdamW(LR, weight_decay=0.5)
    adamw.exclude_from_weight_decay(var_names=["kernel"])
    return adamw


def check_fit(make_optimizer, callbacks_module, name: str, inner=sgd) -> None:
    x, y = data()
    init = model(0).get_weights()  # rank 0's initial weights: the reference's
    m = model(1 + RANK)  # every rank starts elsewhere: the callback must fix it
    m.compile(optimizer=make_optimizer(inner()), loss="mse", metrics=["mae"])
    before, after = Recorder(), Recorder()
    callbacks = [callbacks_module.BroadcastGlobalVariablesCallback(0), before]
    if callbacks_module is hvd_keras.callbacks:
        callbacks.append(hvd_keras.callbacks.MetricAverageCallback())
    callbacks.append(after)
    if RANK == 0:
        m.set_weights(init)
    m.fit(shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE, epochs=2,
          shuffle=False, verbose=0, callbacks=callbacks)
    weights = m.get_weights()
    entry: dict[str, object] = {"same_on_every_rank": same_on_every_rank(weights)}
    local_logs = hvd.allgather_object(before.logs)
    if RANK == 0:
        ref = model(0)
        ref.set_weights(init)
        ref.compile(optimizer=inner(), loss="mse", metrics=["mae"])
        history = ref.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False,
                          verbose=0)
        entry["weights_rel_diff"] = rel_diff(weights, ref.get_weights())
        entry["moved"] = rel_diff(init, ref.get_weights())
        if callbacks_module is hvd_keras.callbacks:
            averaged = [[np.mean([r[e][k] for r in local_logs])
                         for k in ("loss", "mae")] for e in range(2)]
            entry["metric_average_diff"] = max(
                abs(after.logs[e][k] - averaged[e][i])
                for e in range(2) for i, k in enumerate(("loss", "mae")))
            entry["ranks_differ_before_average"] = any(
                r[0]["loss"] != local_logs[0][0]["loss"] for r in local_logs)
            entry["loss_vs_whole_batch"] = max(
                abs(a["loss"] - b) for a, b in zip(after.logs, history.history["loss"]))
    results[name] = entry


def started_apart() -> tuple:
    """The data, rank 0's initial weights (the reference's) and this rank's
    model, which holds them on rank 0 only (the others start elsewhere)."""
    x, y = data()
    init = model(0).get_weights()
    m = model(1 + RANK)
    if RANK == 0:
        m.set_weights(init)
    return x, y, init, m


def check_tape() -> None:
    x, y, init, m = started_apart()
    hvd.broadcast_variables(m.variables, root_rank=0)
    opt = keras.optimizers.SGD(LR)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(xb, training=True) - yb))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, m.trainable_variables)
        opt.apply_gradients(zip(grads, m.trainable_variables))
        return loss

    local = GLOBAL_BATCH // SIZE
    xs, ys = shard(x), shard(y)
    for s in range(STEPS):
        step(xs[s * local:(s + 1) * local], ys[s * local:(s + 1) * local])
    same = same_on_every_rank(m.get_weights())
    entry: dict[str, object] = {"same_on_every_rank": same}
    if RANK == 0:
        ref = model(0)
        ref.set_weights(init)
        ref_opt = keras.optimizers.SGD(LR)
        for s in range(STEPS):
            sl = slice(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(ref(x[sl], training=True) - y[sl]))
            grads = tape.gradient(loss, ref.trainable_variables)
            ref_opt.apply_gradients(zip(grads, ref.trainable_variables))
        entry["weights_rel_diff"] = rel_diff(m.get_weights(), ref.get_weights())
    results["tape"] = entry
    check_two_tapes()


def check_two_tapes() -> None:
    """Two DistributedGradientTapes in one tf.function, as a GAN's step has.

    Their all-reduces run side by side; they used to share names and fail.
    Each model ends where one process trained on the whole batches ends.
    """
    x, y = data()
    init = model(0).get_weights()
    nets = [model(0), model(0)]
    opts = [keras.optimizers.SGD(LR), keras.optimizers.SGD(LR)]
    for net in nets:
        net.set_weights(init)

    def losses(models, xb, yb):
        a = tf.reduce_mean(tf.square(models[0](xb, training=True) - yb))
        b = tf.reduce_mean(tf.abs(models[1](xb, training=True) - yb))
        return a, b

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape_a, tf.GradientTape() as tape_b:
            loss_a, loss_b = losses(nets, xb, yb)
        for tape, loss, net, opt in ((tape_a, loss_a, nets[0], opts[0]),
                                     (tape_b, loss_b, nets[1], opts[1])):
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, net.trainable_variables)
            opt.apply_gradients(zip(grads, net.trainable_variables))

    local = GLOBAL_BATCH // SIZE
    xs, ys = shard(x), shard(y)
    for s in range(STEPS):
        step(xs[s * local:(s + 1) * local], ys[s * local:(s + 1) * local])
    refs = [model(0), model(0)]
    ref_opts = [keras.optimizers.SGD(LR), keras.optimizers.SGD(LR)]
    for ref in refs:
        ref.set_weights(init)
    for s in range(STEPS):
        sl = slice(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)
        with tf.GradientTape(persistent=True) as tape:
            ref_losses = losses(refs, x[sl], y[sl])
        for loss, ref, opt in zip(ref_losses, refs, ref_opts):
            opt.apply_gradients(zip(tape.gradient(loss, ref.trainable_variables),
                                    ref.trainable_variables))
    diffs = [rel_diff(net.get_weights(), ref.get_weights())
             for net, ref in zip(nets, refs)]
    results["two_tapes_rel_diff"] = max(diffs)
    assert max(diffs) < 1e-5, diffs
    assert all(same_on_every_rank(net.get_weights()) for net in nets)


def check_v1_optimizer() -> None:
    """hvd.DistributedOptimizer over a tf.compat.v1 optimizer, in a TF1 session."""
    x, y = data()

    def train(w0: np.ndarray, xs: np.ndarray, ys: np.ndarray, batch: int,
              distributed: bool) -> np.ndarray:
        g = tf.Graph()
        with g.as_default():
            w = tf.compat.v1.get_variable("w", initializer=w0)
            xb = tf.compat.v1.placeholder(tf.float32, [batch, 5])
            yb = tf.compat.v1.placeholder(tf.float32, [batch, 2])
            loss = tf.reduce_mean(tf.square(tf.tanh(xb @ w) - yb))
            opt = tf.compat.v1.train.MomentumOptimizer(LR, 0.9)
            if distributed:
                opt = hvd.DistributedOptimizer(opt)
            train_op = opt.minimize(loss)
            init = tf.compat.v1.global_variables_initializer()
            bcast = hvd.broadcast_global_variables(0) if distributed else None
            with tf.compat.v1.Session(graph=g) as sess:
                sess.run(init)
                if bcast is not None:
                    sess.run(bcast)
                for s in range(STEPS):
                    sl = slice(s * batch, (s + 1) * batch)
                    sess.run(train_op, {xb: xs[sl], yb: ys[sl]})
                return sess.run(w)

    def start(seed: int) -> np.ndarray:
        return np.random.RandomState(seed).randn(5, 2).astype("float32")

    got = train(start(RANK), shard(x), shard(y), GLOBAL_BATCH // SIZE, True)
    entry: dict[str, object] = {"same_on_every_rank": same_on_every_rank([got])}
    if RANK == 0:
        want = train(start(0), x, y, GLOBAL_BATCH, False)
        entry["weights_rel_diff"] = rel_diff([got], [want])
        entry["moved"] = float(np.max(np.abs(want - start(0))))
        # What the test would see if the gradients were not reduced.
        alone = train(start(0), shard(x), shard(y), GLOBAL_BATCH // SIZE, False)
        entry["unreduced_rel_diff"] = rel_diff([alone], [want])
    results["v1_optimizer"] = entry


def check_mixed_precision() -> None:
    """Loss scaling around a DistributedOptimizer when only one rank overflows."""
    entry: dict[str, object] = {}
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        rng = np.random.RandomState(RANK)
        x = 0.01 * rng.randn(32, 4).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        if RANK == 1:
            x[3, 0] = 6e4  # this rank's first batch overflows in float16
        for wrap in ("compile", "explicit"):
            keras.utils.set_random_seed(0)
            m = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
            if wrap == "compile":  # Keras wraps the DistributedOptimizer
                opt = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.01))
            else:  # the user wraps the loss-scale optimizer
                opt = hvd_keras.DistributedOptimizer(
                    keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)))
            m.compile(optimizer=opt, loss="mse")
            m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
            scale = float(m.optimizer.dynamic_scale.numpy())
            entry[wrap] = {
                "same_on_every_rank": same_on_every_rank(m.get_weights() + [scale]),
                "scale": scale,
                "iterations": int(m.optimizer.iterations.numpy()),
            }
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    results["mixed_precision"] = entry


def check_collectives() -> None:
    entry: dict[str, object] = {}
    # IndexedSlices: gathered rows, values averaged by the size.
    s = tf.IndexedSlices(tf.fill([RANK + 1, 2], float(RANK + 1)),
                         tf.fill([RANK + 1], RANK), tf.constant([SIZE, 2]))
    out = hvd.allreduce(s)
    expect_idx = np.concatenate([[r] * (r + 1) for r in range(SIZE)])
    expect_val = np.concatenate([np.full((r + 1, 2), (r + 1) / SIZE)
                                 for r in range(SIZE)])
    entry["sparse"] = bool(np.array_equal(out.indices, expect_idx)
                           and np.allclose(out.values, expect_val))
    # Dense ops with scaling and fp16 compression, inside tf.function.
    base = np.arange(6, dtype=np.float32).reshape(3, 2) + RANK

    @tf.function
    def fn(t):
        return (hvd.allreduce(t, op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0),
                hvd.grouped_allreduce([t, 2 * t], compression=hvd.Compression.fp16),
                hvd.allreduce(t, op=hvd.Max), hvd.allreduce(t, average=True))

    total, grouped, mx, avg = fn(tf.constant(base))
    all_base = [np.arange(6, dtype=np.float32).reshape(3, 2) + r for r in range(SIZE)]
    entry["dense"] = bool(
        np.allclose(total, 1.5 * sum(all_base))
        and np.allclose(grouped[0], np.mean(all_base, 0))
        and np.allclose(grouped[1], 2 * np.mean(all_base, 0))
        and grouped[1].dtype == tf.float32
        and np.array_equal(mx, np.max(all_base, 0))
        and np.allclose(avg, np.mean(all_base, 0)))
    # Keras-level NumPy collectives.
    entry["keras_numpy"] = bool(
        np.allclose(hvd_keras.allreduce(np.array([RANK], np.float64), op=hvd.Sum),
                    [sum(range(SIZE))])
        and np.array_equal(hvd_keras.allgather(np.array([RANK])), np.arange(SIZE))
        and np.array_equal(hvd_keras.broadcast(np.array([RANK]), SIZE - 1),
                           [SIZE - 1]))
    # Objects.
    entry["broadcast_object"] = hvd.broadcast_object(
        {"from": RANK, "f": (lambda v: v * 2)} if RANK == SIZE - 1 else None,
        root_rank=SIZE - 1)["from"] == SIZE - 1
    entry["allgather_object"] = hvd.allgather_object("r" * (RANK + 1)) == [
        "r" * (r + 1) for r in range(SIZE)]
    # Integer IndexedSlices averaged: Horovod's true division (float64).
    ints = tf.IndexedSlices(tf.fill([1, 2], RANK + 1), tf.constant([RANK]))
    avg = hvd.allreduce(ints, op=hvd.Average)
    entry["sparse_int_average"] = bool(
        avg.values.dtype == tf.float64
        and np.allclose(avg.values, [[(r + 1) / SIZE] * 2 for r in range(SIZE)]))
    # alltoall: the received splits come back only when splits are given.
    rows = tf.fill([SIZE, 2], RANK)
    received = hvd.alltoall(rows)
    pair = hvd.alltoall(rows, splits=[1] * SIZE)
    entry["alltoall"] = bool(
        isinstance(received, tf.Tensor)
        and np.array_equal(received, np.repeat(np.arange(SIZE), 2).reshape(SIZE, 2))
        and np.array_equal(pair[0], received) and np.array_equal(pair[1], [1] * SIZE))
    # A tf.compat.v1 graph: grouped allgather/reducescatter (named from the
    # graph), integer prescaling done in float64 by the op, and a broadcast's
    # gradient (a non-root rank must still run the gradient's all-reduce).
    with tf.Graph().as_default():
        a = tf.constant(np.arange(2 * SIZE, dtype=np.int32) + RANK)
        gathered = hvd.grouped_allgather([a[:1], a[:2]])
        scattered = hvd.grouped_reducescatter([a], op=hvd.Sum, prescale_factor=0.5)
        x = tf.constant([1.0, 2.0])
        grad_b = tf.gradients(hvd.broadcast(x, 0), x, tf.ones([2]))[0]
        with tf.compat.v1.Session() as sess:
            g_v, s_v, gb_v = sess.run([gathered, scattered, grad_b])
    every = [np.arange(2 * SIZE, dtype=np.int32) + r for r in range(SIZE)]
    halves = sum(np.trunc(e * 0.5).astype(np.int32) for e in every)
    entry["graph_grouped"] = bool(
        np.array_equal(g_v[0], [e[0] for e in every])
        and np.array_equal(g_v[1], np.concatenate([e[:2] for e in every]))
        and np.array_equal(s_v[0], halves[2 * RANK:2 * RANK + 2])
        and np.array_equal(gb_v, [1.0, 1.0] if RANK == 0 else [0.0, 0.0]))
    # Variables broadcast in place from the last rank.
    v = tf.Variable([float(RANK)] * 3)
    hvd.broadcast_(v, SIZE - 1)
    entry["broadcast_"] = bool(np.array_equal(v.numpy(), [SIZE - 1.0] * 3))
    # In a tf.compat.v1 graph, evaluating broadcast_'s result broadcasts.
    with tf.Graph().as_default():
        gv = tf.compat.v1.Variable([float(RANK)] * 2)
        out, = hvd.broadcast_([gv], SIZE - 1, name="graph_broadcast_")
        with tf.compat.v1.Session() as sess:
            sess.run(gv.initializer)
            got = sess.run(out)
            entry["broadcast_graph"] = bool(
                np.array_equal(got, [SIZE - 1.0] * 2)
                and np.array_equal(sess.run(gv), [SIZE - 1.0] * 2))
    # Gradient of an allreduce inside the tape.
    w = tf.Variable(float(RANK + 1))
    with tf.GradientTape() as tape:
        loss = hvd.allreduce(w * w, op=hvd.Sum)
    entry["allreduce_grad"] = float(tape.gradient(loss, w))
    # Inside XLA (no kernel for the host ops): a clear error when traced.
    try:
        tf.function(lambda t: hvd.allreduce(t), jit_compile=True)(tf.ones([2]))
        entry["xla"] = "no error"
    except ValueError as e:
        entry["xla"] = str(e)
    results["collectives"] = entry


def check_process_sets() -> None:
    entry: dict[str, object] = {}
    try:
        pair = hvd.add_process_set(hvd.ProcessSet([0, 1]))
    except tf.errors.FailedPreconditionError as e:
        # The engine of this build has no sub-communicators yet.
        results["process_sets"] = {"unsupported": e.message}
        return
    entry["included_op"] = int(hvd.process_set_included_op(pair.process_set_id))
    if RANK in (0, 1):
        out = hvd.allreduce(tf.constant([float(RANK + 1)]), op=hvd.Sum,
                            process_set=pair)
        entry["pair_sum"] = float(out.numpy()[0])
        entry["pair_rank"] = pair.rank()
        gathered = hvd.allgather(tf.constant([RANK]), process_set=pair)
        entry["pair_gather"] = gathered.numpy().tolist()
    else:
        entry["pair_rank"] = pair.rank()
        # Horovod's op fails with InvalidArgumentError on a non-member.
        try:
            hvd.allreduce(tf.constant([1.0]), process_set=pair)
            entry["non_member_error"] = "none"
        except tf.errors.InvalidArgumentError as e:
            entry["non_member_error"] = type(e).__name__ + (
                "+ValueError" if isinstance(e, ValueError) else "")
    # Horovod's root_rank is a rank of the job also with a process set; a
    # rank outside a tape's set keeps its own gradient.
    tail = hvd.add_process_set(hvd.ProcessSet([1, 2]))
    if RANK in (1, 2):
        got = hvd.broadcast(tf.constant([float(RANK)]), root_rank=2, process_set=tail)
        entry["tail_broadcast"] = float(got.numpy()[0])
        entry["tail_object"] = hvd.broadcast_object(
            "from 2" if RANK == 2 else None, root_rank=2, process_set=tail)
    x = tf.constant(float(RANK + 1))
    with tf.GradientTape() as g:
        g.watch(x)
        y = x * x
    entry["tape_grad"] = float(hvd.DistributedGradientTape(
        g, process_set=tail).gradient(y, [x])[0])
    hvd.barrier()
    entry["removed"] = hvd.remove_process_set(pair) and hvd.remove_process_set(tail)
    results["process_sets"] = entry


def check_broadcast_callback_local_variables() -> None:
    # Horovod's local_variables: they keep each rank's value; every other
    # variable (model and optimizer) takes the root's.
    root = SIZE - 1
    init = keras.initializers.Constant(float(RANK))
    m = keras.Sequential([keras.Input((3,)),
                          keras.layers.Dense(3, kernel_initializer=init,
                                             bias_initializer=init, trainable=False),
                          keras.layers.Dense(2, kernel_initializer=init,
                                             bias_initializer=init, trainable=False)])
    m.compile(loss="mse", optimizer=hvd_keras.DistributedOptimizer(
        keras.optimizers.SGD(0.1)))
    local = list(m.layers[0].variables)
    cb = hvd_keras.callbacks.BroadcastGlobalVariablesCallback(
        root_rank=root, local_variables=local)
    m.fit(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32), epochs=1,
          batch_size=2, callbacks=[cb], verbose=0)
    ids = {id(v) for v in local}
    results["broadcast_callback_local"] = {
        "local_kept": all(np.all(v.numpy() == RANK) for v in local),
        "others_from_root": all(np.all(v.numpy() == root)
                                for v in m.variables if id(v) not in ids),
    }


def check_broadcast_callback_cases() -> None:
    """The broadcast callback where ranks' variables differ at the start."""
    x, y = data()
    entry: dict[str, object] = {}
    # A lazily built model (no Input) with Dropout, seeded per rank: at the
    # start it holds only Dropout's seed state, so the weights can only be
    # broadcast after the first batch (as Horovod does).
    keras.utils.set_random_seed(10 + RANK)
    lazy = keras.Sequential([keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dropout(0.25), keras.layers.Dense(2)])
    lazy.compile(loss="mse", optimizer=hvd_keras.DistributedOptimizer(
        keras.optimizers.SGD(LR, momentum=0.5)))
    lazy.fit(shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE, epochs=1,
             shuffle=False, verbose=0,
             callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    entry["lazy_same_on_every_rank"] = same_on_every_rank(lazy.get_weights())
    # Horovod's resume pattern: only rank 0 restored an optimizer (its
    # momentum built and non-zero); the others start fresh, lazily built.
    keras.utils.set_random_seed(20 + RANK)
    layers = [keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)]
    resumed = keras.Sequential(([keras.Input((5,))] if RANK == 0 else []) + layers)
    optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.5))
    resumed.compile(loss="mse", optimizer=optimizer)
    if RANK == 0:
        optimizer.build(resumed.trainable_variables)
        for v in optimizer.variables:
            v.assign(tf.ones_like(v) * (7 if "int" in str(v.dtype) else 0.5))
    resumed.fit(shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE, epochs=1,
                shuffle=False, verbose=0,
                callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    entry["resumed_same_on_every_rank"] = same_on_every_rank(
        resumed.get_weights() + [v.numpy() for v in optimizer.variables])
    entry["resumed_iterations"] = int(optimizer.iterations.numpy())
    # Gradients aggregated over backward_passes_per_step stay each rank's
    # when the weights are broadcast after the first batch (same seed on
    # every rank, so the first batch's gradients are the whole batch's).
    def lazy_mlp() -> keras.Model:
        keras.utils.set_random_seed(30)
        return keras.Sequential([keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(2)])

    aggregated = lazy_mlp()
    aggregated.compile(loss="mse", optimizer=hvd_keras.DistributedOptimizer(
        keras.optimizers.SGD(LR), backward_passes_per_step=2))
    aggregated.fit(shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE, epochs=1,
                   shuffle=False, verbose=0,
                   callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    weights = aggregated.get_weights()
    entry["aggregated_same_on_every_rank"] = same_on_every_rank(weights)
    if RANK == 0:
        # Two batches summed, one step: the mean over both batches at 2 * LR.
        ref = lazy_mlp()
        ref.compile(loss="mse", optimizer=keras.optimizers.SGD(2 * LR))
        ref.fit(x, y, batch_size=2 * GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        entry["aggregated_rel_diff"] = rel_diff(weights, ref.get_weights())
    # The warm-up reaches initial_lr on its last batch, as in Horovod.
    warm = model(40)
    warm.compile(loss="mse", optimizer=hvd_keras.DistributedOptimizer(
        keras.optimizers.SGD(0.05)))
    history = warm.fit(
        shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE, epochs=3,
        shuffle=False, verbose=0,
        callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0),
                   hvd_keras.callbacks.LearningRateWarmupCallback(
                       initial_lr=0.2, warmup_epochs=2)])
    entry["warmup_lr"] = [float(v) for v in history.history["lr"]]
    results["broadcast_callback_cases"] = entry


def check_local_gradients_any_op() -> None:
    """Horovod divides local gradients by the set's size whatever the op."""
    w = tf.Variable([1.0])
    with tf.GradientTape() as t:
        loss = 3.0 * tf.reduce_sum(w)
    tape = hvd.DistributedGradientTape(t, op=hvd.Sum)
    tape.register_local_source(w)
    tape_grad = float(tape.gradient(loss, [w])[0].numpy()[0])
    v = tf.Variable([0.0])
    opt = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(1.0), op=hvd.Sum)
    opt.register_local_var(v)
    opt.apply_gradients([(tf.constant([3.0]), v)])
    # PartialDistributedGradientTape takes Horovod's num_groups and groups.
    layer = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)
    shared = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)
    layer.build((None, 1))
    shared.build((None, 1))
    with tf.GradientTape() as t:
        x = tf.ones([1, 1])
        loss = tf.reduce_sum(layer(x) + shared(x * (RANK + 1)))
    partial = hvd.PartialDistributedGradientTape(
        t, op=hvd.Sum, num_groups=1, local_layers=[layer], scale_local_gradients=False)
    local_grad, shared_grad = partial.gradient(loss, [layer.kernel, shared.kernel])
    results["local_gradients_any_op"] = {
        "tape": tape_grad, "keras_step": float(-v.numpy()[0]),
        "partial_local": float(local_grad.numpy().ravel()[0]),
        "partial_shared": float(shared_grad.numpy().ravel()[0]),
    }


def check_partial_tape() -> None:
    keras.utils.set_random_seed(3)
    shared = keras.layers.Dense(2)
    head = keras.layers.Dense(1)
    shared.build((None, 3))
    head.build((None, 2))
    hvd.broadcast_variables(shared.variables + head.variables, 0)
    x = tf.constant(np.full((2, 3), RANK + 1.0, np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(head(shared(x)))
    plain = tape.gradient(loss, head.trainable_variables + shared.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(head(shared(x)))
    tape = hvd.PartialDistributedGradientTape(tape, local_layers=[head])
    grads = tape.gradient(loss, head.trainable_variables + shared.trainable_variables)
    local_ok = all(np.allclose(g, p / SIZE) for g, p in zip(grads[:2], plain[:2]))
    gathered = hvd.allgather_object([p.numpy() for p in plain[2:]])
    mean = [np.mean([g[i] for g in gathered], 0) for i in range(2)]
    shared_ok = all(np.allclose(g, m, atol=1e-6) for g, m in zip(grads[2:], mean))
    # The same gradients split into (variable, gradient) pairs (Horovod's
    # get_local_and_global_gradients), in source order.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(head(shared(x)))
    tape = hvd.PartialDistributedGradientTape(tape, local_layers=[head])
    local_pairs, global_pairs = tape.get_local_and_global_gradients(
        loss, shared.trainable_variables + head.trainable_variables)
    paths = [[v.path for v, _ in pairs] for pairs in (local_pairs, global_pairs)]
    expected = [[v.path for v in layer.trainable_variables] for layer in (head, shared)]
    split_ok = paths == expected and all(
        np.allclose(g, e) for (_, g), e in zip(local_pairs + global_pairs, grads))
    results["partial_tape"] = {"local_scaled": bool(local_ok),
                               "shared_averaged": bool(shared_ok),
                               "split": bool(split_ok)}


def check_sync_batch_norm() -> None:
    rng = np.random.RandomState(5)
    x = (rng.randn(GLOBAL_BATCH, 3) * 2 + 1).astype("float32")
    local = GLOBAL_BATCH // SIZE
    mine = x[RANK * local:(RANK + 1) * local]
    sync = hvd.SyncBatchNormalization(momentum=0.5)
    plain = keras.layers.BatchNormalization(momentum=0.5)
    sync.build((None, 3))
    plain.build((None, 3))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ref = plain(xt, training=True)
        ref_loss = tf.reduce_sum(ref * tf.range(1.0, 4.0))
    ref_grad = tape.gradient(ref_loss, xt)[RANK * local:(RANK + 1) * local]
    mt = tf.constant(mine)
    with tf.GradientTape() as tape:
        tape.watch(mt)
        out = sync(mt, training=True)
        loss = tf.reduce_sum(out * tf.range(1.0, 4.0))
    grad = tape.gradient(loss, mt)
    results["sync_batch_norm"] = {
        "output_diff": float(np.max(np.abs(
            out - ref[RANK * local:(RANK + 1) * local]))),
        "grad_diff": float(np.max(np.abs(grad - ref_grad))),
        "moving_mean_diff": float(np.max(np.abs(sync.moving_mean.numpy()
                                                - plain.moving_mean.numpy()))),
        "moving_var_diff": float(np.max(np.abs(sync.moving_variance.numpy()
                                               - plain.moving_variance.numpy()))),
    }

    # One layer applied to two inputs in one tf.function (shared weights, as
    # in a siamese model): two collectives side by side, each normalising its
    # own input over every rank's rows. They used to share a name and fail.
    shared = hvd.SyncBatchNormalization()
    shared.build((None, 3))
    other = (x[::-1] * 3 - 2).copy()

    @tf.function
    def twice(a, b):
        return shared(a, training=True), shared(b, training=True)

    outs = twice(mt, tf.constant(other[RANK * local:(RANK + 1) * local]))
    for got, full in zip(outs, (x, other)):
        want = keras.layers.BatchNormalization()(tf.constant(full), training=True)
        diff = float(np.max(np.abs(got - want[RANK * local:(RANK + 1) * local])))
        assert diff < 1e-5, diff


def check_sdp() -> None:
    grads = [tf.constant([float(RANK)]), tf.constant([2.0 * RANK])]
    out = [sdp.allreduce(g, i, len(grads))
           for i, g in reversed(list(enumerate(grads)))]
    mean = np.mean(range(SIZE))
    results["sdp"] = {
        "allreduce": bool(np.allclose(out[1], [mean])
                          and np.allclose(out[0], [2 * mean])),
        "oob": float(sdp.oob_allreduce(tf.constant([1.0]), op=sdp.ReduceOp.SUM)[0]),
    }

    # SageMaker data parallel's TF2 example: after the first step, one
    # tf.function broadcasts the model's variables, then the optimizer's.
    # (Both calls used to name their broadcasts alike and failed.)
    keras.utils.set_random_seed(RANK)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(0.1)

    @tf.function
    def first_step(x, first_batch):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(x))
        tape = sdp.DistributedGradientTape(tape)
        grads = tape.gradient(loss, net.trainable_variables)
        opt.apply_gradients(zip(grads, net.trainable_variables))
        if first_batch:
            sdp.broadcast_variables(net.variables, root_rank=0)
            sdp.broadcast_variables(opt.variables(), root_rank=0)

    first_step(tf.fill([4, 3], float(RANK + 1)), True)
    state = np.concatenate([np.ravel(v) for v in net.get_weights()]
                           + [np.ravel(v.numpy()) for v in opt.variables])
    gathered = hvd.allgather(tf.constant(state[None, :])).numpy()
    same = bool((gathered == gathered[0]).all())
    results["sdp_broadcast_model_then_optimizer"] = same
    assert same, gathered


def check_elastic() -> None:
    # A Horovod elastic Keras script at a fixed size: `run` syncs rank 0's
    # model and state (the ranks start apart), the callbacks keep `batch`
    # and `epoch` and commit; a host update recorded on rank 0 after the
    # first epoch interrupts every rank at the next commit, and `run` calls
    # the function again for the epochs left. Training equals one process
    # on the whole batches for 2 epochs.
    x, y, init, m = started_apart()
    m.compile(optimizer=hvd_keras.DistributedOptimizer(
        keras.optimizers.SGD(LR, momentum=0.5)), loss="mse")
    state = hvd_keras.elastic.KerasState(m, batch=0, epoch=3 * RANK)
    resets, calls = [], []
    state.register_reset_callbacks([lambda: resets.append(state.epoch)])

    class HostUpdate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if RANK == 0 and len(calls) == 1:
                state.on_hosts_updated(1.0)

    @hvd_keras.elastic.run
    def train(state):
        calls.append(state.epoch)
        state.model.fit(
            shard(x), shard(y), batch_size=GLOBAL_BATCH // SIZE,
            epochs=2 - state.epoch, shuffle=False, verbose=0, callbacks=[
                HostUpdate(), hvd_keras.elastic.UpdateBatchStateCallback(state),
                hvd_keras.elastic.UpdateEpochStateCallback(state),
                hvd_keras.elastic.CommitStateCallback(state, batches_per_commit=3)])
        return state.epoch

    final_epoch = train(state)
    weights = m.get_weights()
    entry: dict[str, object] = {
        "same_on_every_rank": same_on_every_rank(weights), "calls": calls,
        "resets": resets, "final_epoch": final_epoch}
    if RANK == 0:
        ref = model(0)
        ref.set_weights(init)
        ref.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.5), loss="mse")
        ref.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
        entry["weights_rel_diff"] = rel_diff(weights, ref.get_weights())
    # restore() returns to the last commit: the weights of the end of training.
    m.set_weights([np.zeros_like(w) for w in weights])
    state.epoch = 7
    state.restore()
    entry["restored"] = bool(state.epoch == 2 and all(
        np.array_equal(a, b) for a, b in zip(m.get_weights(), weights)))
    results["elastic"] = entry


CHECKS = {
    "elastic": check_elastic,
    "collectives": check_collectives,
    "process_sets": check_process_sets,
    "partial_tape": check_partial_tape,
    "broadcast_callback_local": check_broadcast_callback_local_variables,
    "broadcast_callback_cases": check_broadcast_callback_cases,
    "local_gradients_any_op": check_local_gradients_any_op,
    "sync_batch_norm": check_sync_batch_norm,
    "sdp": check_sdp,
    "tape": check_tape,
    "mixed_precision": check_mixed_precision,
    "v1_optimizer": check_v1_optimizer,
    "fit": lambda: check_fit(hvd_keras.DistributedOptimizer, hvd_keras.callbacks,
                             "fit"),
    "sdp_fit": lambda: check_fit(sdp_keras.DistributedOptimizer, sdp_keras.callbacks,
                                 "sdp_fit"),
    # Keras clips and accumulates in `apply`, after the all-reduce here: as
    # one process on the whole batches (under a tf.distribute strategy Keras
    # clips each replica's gradients, and accumulation fails).
    "fit_clip_accumulate": lambda: check_fit(
        hvd_keras.DistributedOptimizer, hvd_keras.callbacks, "fit_clip_accumulate",
        inner=lambda: keras.optimizers.SGD(LR, momentum=0.5, global_clipnorm=0.05,
                                           gradient_accumulation_steps=2)),
    # exclude_from_weight_decay, which the optimizer's config does not carry.
    "fit_adamw_exclude": lambda: check_fit(
        hvd_keras.DistributedOptimizer, hvd_keras.callbacks, "fit_adamw_exclude",
        inner=adamw_excluding_kernels),
}
for check in (sys.argv[2].split(",") if len(sys.argv) > 2 else CHECKS):
    CHECKS[check]()

with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(results, f)
hvd.shutdown()
