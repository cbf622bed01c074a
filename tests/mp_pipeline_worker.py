"""One rank of the pipeline-across-processes tests (run by the launcher).

Usage: python mp_pipeline_worker.py OUT_DIR CHECK [CHECK ...]

A CHECK is a case name of `mp_pipeline_common.CASES` (fit, then the
weights, losses, evaluate and predict), `mismatch` (rank-dependent
partitions), `auto` (partition from rank 0's profile), `example` (runs
examples/pipeline_hybrid.py), `checkpoint` (BackupAndRestore interrupted
and resumed, ModelCheckpoint), `custom` (custom training loop), `embedding`
(sparse gradients, Adam), `regularized` (weight regularizers on both
stages: fit, evaluate, a custom step), `two_outputs` (3 stages, an output
of the middle one, losses by output name), `shuffled` (fit's own shuffling,
ranks seeded apart), `mixed` (mixed_float16 with loss scaling, against
plain Keras) or `die` (the last rank exits during training).
Each rank writes OUT_DIR/rank{r}_{check}.npz and OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mp_pipeline_common import (  # noqa: E402
    CASES,
    DEFERRED,
    EMBEDDING_CLIP,
    EMBEDDING_PARTITION,
    EVALUATED,
    GLOBAL_BATCH,
    REGULARIZED_PARTITION,
    SAVED,
    TWO_OUTPUT_PARTITION,
    data,
    embedding_data,
    embedding_model,
    model,
    optimizer,
    regularized_model,
    two_output_compile,
    two_output_data,
    two_output_model,
)

import tf_smdist as smd  # noqa: E402
from tf_smdist.data_parallel import cluster  # noqa: E402

OUT, CHECKS = sys.argv[1], sys.argv[2:]
RANK, WORLD = cluster.initialize()
RESULTS: dict = {}


def pipeline(case: str, *, seed: int | None = None, opt: str | None = None,
             **overrides) -> smd.PipelineModel:
    kind, stages, micro, schedule, case_opt, partition, placement, _ = CASES[case]
    opt = opt or case_opt
    # Each rank starts from other random weights: equal results mean rank
    # 0's initial weights were broadcast.
    net = model(kind, seed=RANK + 1 if seed is None else seed)
    args = dict(num_stages=stages, microbatches=micro, schedule=schedule,
                partition=partition, placement=placement,
                defer_weight_gradients=case in DEFERRED)
    args.update(overrides)
    pipe = smd.PipelineModel(net, **args)
    pipe.compile(optimizer=optimizer(opt), loss="mse", metrics=["mae"])
    return pipe


def save(name: str, **arrays) -> None:
    np.savez(os.path.join(OUT, f"rank{RANK}_{name}.npz"), **arrays)


def run_case(case: str) -> None:
    epochs = CASES[case][-1]
    pipe = pipeline(case)
    init = pipe.get_weights()
    x, y = data()
    history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs,
                       shuffle=False, verbose=0)
    local = [np.array(v.value) for v in pipe._process.runtime.variables]
    final = pipe.get_weights()
    restored = None
    if case in SAVED:
        # The whole optimizer state to a file (rank 0) and back to each
        # stage's ranks in every pipeline.
        pipe.save_weights(os.path.join(OUT, f"{case}.weights.h5"))
        before = [np.array(v.value) for v in pipe.optimizer.variables]
        for v in pipe.optimizer.variables:
            v.assign(tf.zeros_like(v.value))
        pipe.load_weights(os.path.join(OUT, f"{case}.weights.h5"))
        restored = all(np.array_equal(a, np.array(v.value))
                       for a, v in zip(before, pipe.optimizer.variables))
    evaluated, predicted = None, np.zeros(0)
    if case in EVALUATED:
        # Inputs of the wrong structure fail alike on every rank, and the
        # pipeline stays usable (its communication is not stopped).
        try:
            pipe.predict([x[:8], x[:8]], verbose=0)
        except ValueError as e:
            RESULTS.setdefault("structure_errors", []).append(type(e).__name__)
        evaluated = pipe.evaluate(x[:33], y[:33], batch_size=GLOBAL_BATCH, verbose=0)
        predicted = pipe.predict(x[:37], batch_size=GLOBAL_BATCH, verbose=0)
    save(case, predicted=predicted,
         **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"final_{i}": w for i, w in enumerate(final)},
         **{f"local_{i}": w for i, w in enumerate(local)})
    RESULTS[case] = {
        "loss": history.history["loss"], "mae": history.history["mae"],
        "evaluate": evaluated, "stage": pipe.stage_rank, "dp": pipe.dp_rank,
        "pipeline_ranks": pipe.pipeline_ranks,
        "dp_group_ranks": pipe.dp_group_ranks, "memory": pipe.memory_report(),
        "num_weights": len(init), "optimizer_restored": restored,
        "deferred": {str(k): v for k, v in
                     pipe._process.runtime.deferred_weight_gradients.items()},
    }


def run_embedding() -> None:
    # Also with the whole model's global_clipnorm: Keras' norm counts each
    # repeated row's slice, and its clipped IndexedSlices reach Adam dense.
    for name, options in (("embedding", {}),
                          ("embedding_clip", {"global_clipnorm": EMBEDDING_CLIP})):
        pipe = smd.PipelineModel(embedding_model(seed=RANK + 1), num_stages=2,
                                 microbatches=2, schedule="gpipe",
                                 partition=EMBEDDING_PARTITION)
        pipe.compile(optimizer=keras.optimizers.Adam(0.01, **options),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        init = pipe.get_weights()
        x, y = embedding_data()
        history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False,
                           verbose=0)
        final = pipe.get_weights()
        save(name, **{f"init_{i}": w for i, w in enumerate(init)},
             **{f"final_{i}": w for i, w in enumerate(final)})
        RESULTS[name] = {"loss": history.history["loss"], "num_weights": len(init)}


def run_regularized() -> None:
    # Weight regularizers on both stages: fit, evaluate, then one custom step.
    pipe = smd.PipelineModel(regularized_model(seed=RANK + 1), num_stages=2,
                             microbatches=2, partition=REGULARIZED_PARTITION)
    pipe.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    init = pipe.get_weights()
    x, y = data()
    history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
                       verbose=0)
    evaluated = pipe.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0)
    fitted = pipe.get_weights()

    @tf.function
    def step(xb, yb):
        loss, _, grads = pipe.compute_gradients(xb, yb)
        pipe.apply_gradients(grads)
        return loss

    custom = float(step(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]))
    save("regularized", **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"fitted_{i}": w for i, w in enumerate(fitted)},
         **{f"final_{i}": w for i, w in enumerate(pipe.get_weights())})
    RESULTS["regularized"] = {"loss": history.history["loss"], "evaluate": evaluated,
                              "custom_loss": custom, "num_weights": len(init)}


def run_two_outputs() -> None:
    pipe = smd.PipelineModel(two_output_model(seed=RANK + 1), num_stages=3,
                             microbatches=2, partition=TWO_OUTPUT_PARTITION)
    pipe.compile(**two_output_compile())
    init = pipe.get_weights()
    x, y = two_output_data()
    history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False,
                       verbose=0)
    evaluated = pipe.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0,
                              return_dict=True)
    save("two_outputs", **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"final_{i}": w for i, w in enumerate(pipe.get_weights())})
    RESULTS["two_outputs"] = {"history": history.history, "evaluate": evaluated,
                              "num_weights": len(init)}


def run_shuffled() -> None:
    # fit's default shuffle=True with every rank's random seed different (as
    # in a script that sets none): the first stage's inputs must still meet
    # their own targets on the last stage. y is linear in x, so the loss
    # falls near 0 only if they do (paired at random it stays near 3).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    y = x @ rng.standard_normal((4, 2)).astype(np.float32)
    keras.utils.set_random_seed(100 + RANK)
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                            keras.layers.Dense(8), keras.layers.Dense(2)])
    pipe = smd.PipelineModel(net, num_stages=2, microbatches=2, partition=[2, 1])
    pipe.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    history = pipe.fit(x, y, batch_size=32, epochs=15, verbose=0)
    RESULTS["shuffled"] = {"loss": history.history["loss"]}


def run_mixed() -> None:
    # mixed_float16: Keras wraps the optimizer in a LossScaleOptimizer. Its
    # large initial scale overflows the first steps' float16 gradients on
    # the first stage only (the last stage holds the float32 output layer):
    # every rank must skip those steps and lower its scale together, as
    # plain Keras does with all the gradients in one process.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        def build() -> keras.Model:
            keras.utils.set_random_seed(0)
            return keras.Sequential([
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh", use_bias=False),
                keras.layers.Dense(8, activation="tanh", use_bias=False),
                keras.layers.Dense(3, dtype="float32")])

        def scaled_sgd(**options) -> keras.optimizers.Optimizer:
            return keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1, **options), initial_scale=2.0 ** 26)

        # Small inputs and no float16 biases: the overflow starts in the
        # activations' gradients, which are the same per sample whether a
        # batch is split into micro-batches or not. (A bias's gradient sums
        # over the rows, and its float16 sum over a whole batch can overflow
        # where the micro-batches' do not: then the pipeline rightly applies
        # a step that plain Keras skips.)
        x, y = data()
        x = x * 0.01

        def train_plain(init, **options) -> tuple[keras.Model, list]:
            plain = build()
            plain.set_weights(init)
            plain.compile(optimizer=scaled_sgd(**options), loss="mse")
            return plain, plain.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3,
                                    shuffle=False, verbose=0).history["loss"]

        def train_pipe(init, **options) -> tuple[smd.PipelineModel, list]:
            net = build()
            net.set_weights(init)
            pipe = smd.PipelineModel(net, num_stages=2, microbatches=2,
                                     partition=[2, 1])
            pipe.compile(optimizer=scaled_sgd(**options), loss="mse")
            return pipe, pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3,
                                  shuffle=False, verbose=0).history["loss"]

        def compared(trained, reference, init) -> dict:
            (pipe, loss), (plain, expected) = trained, reference
            return {
                "loss": loss, "expected_loss": expected,
                "scale": float(pipe.optimizer.dynamic_scale.numpy()),
                "expected_scale": float(plain.optimizer.dynamic_scale.numpy()),
                "max_diff": max(float(np.abs(a - b).max()) for a, b in
                                zip(pipe.get_weights(), plain.get_weights())),
                "moved": max(float(np.abs(a - b).max())
                             for a, b in zip(init, plain.get_weights()))}

        init = build().get_weights()
        reference = train_plain(init)
        trained = train_pipe(init)
        pipe = trained[0]
        # The optimizer state round-trips through a weight file: the
        # LossScaleOptimizer's own iteration and learning rate beside its
        # inner optimizer's (the same names) used to make saving fail.
        path = os.path.join(OUT, "mixed.weights.h5")
        pipe.save_weights(path)
        scale = pipe.optimizer.dynamic_scale
        kept = float(scale.numpy())
        scale.assign(1.0)
        pipe.load_weights(path)
        RESULTS["mixed"] = {
            "reloaded_scale": float(scale.numpy()), "saved_scale": kept,
            **compared(trained, reference, init)}
        # The whole model's global_clipnorm inside the LossScaleOptimizer,
        # with gradient accumulation: Keras clips the unscaled mean of the
        # accumulated gradients at its update steps.
        options = {"global_clipnorm": 0.02, "gradient_accumulation_steps": 2}
        clipped = train_plain(init, **options)
        RESULTS["mixed_clip"] = {
            **compared(train_pipe(init, **options), clipped, init),
            "clip_effect": max(
                float(np.abs(a - b).max()) for a, b in zip(
                    clipped[0].get_weights(),
                    train_plain(init, gradient_accumulation_steps=2)[0].get_weights()))}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def run_mismatch() -> None:
    partition = [2, 2] if RANK == 0 else [3, 1]
    try:
        pipeline("seq_1f1b_sgd", partition=partition)
    except ValueError as e:
        RESULTS["mismatch"] = str(e)
    try:  # other gradient buckets on each rank
        pipeline("seq_1f1b_sgd", bucket_cap_mb=1.0 + RANK)
    except ValueError as e:
        RESULTS["mismatch_buckets"] = str(e)
    try:
        smd.PipelineModel(model("seq"), num_stages=WORLD + 1, microbatches=2)
    except ValueError as e:
        RESULTS["bad_stages"] = str(e)
    pipe = pipeline("seq_1f1b_sgd")
    x, y = data()
    try:  # 4 micro-batches do not divide a batch of 10
        pipe.fit(x, y, batch_size=10, epochs=1, verbose=0)
    except ValueError as e:
        RESULTS["bad_batch"] = str(e)
    try:  # rank 0 cannot read the file: every rank raises, none waits
        pipe.load_weights(os.path.join(OUT, "missing.weights.h5"))
    except Exception as e:  # noqa: BLE001 (the type differs by rank)
        RESULTS["bad_load"] = f"{type(e).__name__}: {e}"
    try:  # the same with the inputs in a list, also before any message
        pipe.fit([x], y, batch_size=10, epochs=1, verbose=0)
    except ValueError as e:
        RESULTS["bad_batch_list"] = str(e)


class _Stop(Exception):
    pass


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Stop()


def run_checkpoint() -> None:
    case = "seq_1f1b_sgd"
    x, y = data()
    backup = os.path.join(OUT, "backup")
    pipe = pipeline(case, opt="adam")  # its moments and step count must resume
    init = pipe.get_weights()
    try:
        pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, shuffle=False, verbose=0,
                 callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAfter(1)])
    except _Stop:
        pass
    # A fresh process would start here: new model, other initial weights.
    pipe = pipeline(case, seed=RANK + 50, opt="adam")
    ckpt = os.path.join(OUT, "ckpt.keras")
    history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, shuffle=False,
                       verbose=0, callbacks=[
                           keras.callbacks.BackupAndRestore(backup),
                           keras.callbacks.ModelCheckpoint(ckpt)])
    final = pipe.get_weights()
    # The whole optimizer state, in the file a compiled plain model writes.
    pipe.save_weights(os.path.join(OUT, "trained.weights.h5"))
    save("checkpoint", **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"final_{i}": w for i, w in enumerate(final)})
    RESULTS["checkpoint"] = {"loss": history.history["loss"],
                             "num_weights": len(init),
                             "iterations": int(pipe.optimizer.iterations.numpy())}


def run_custom() -> None:
    case = "seq_1f1b_sgd_clip"
    pipe = pipeline(case)
    init = pipe.get_weights()
    x, y = data()

    @tf.function
    def step(xb, yb):
        loss, _, grads = pipe.compute_gradients(xb, yb)
        pipe.apply_gradients(grads)  # this process's variables
        return loss

    losses = []
    for _ in range(CASES[case][-1]):
        for start in range(0, len(x), GLOBAL_BATCH):
            losses.append(float(step(x[start:start + GLOBAL_BATCH],
                                     y[start:start + GLOBAL_BATCH])))
    final = pipe.get_weights()
    # set_weights (the same weights on every rank) sets the whole model, and
    # train_on_batch is the one-call step: from `init`, the first loss again.
    pipe.set_weights(init)
    restored = all(np.array_equal(a, b) for a, b in zip(pipe.get_weights(), init))
    first = float(pipe.train_on_batch(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH],
                                      return_dict=True)["loss"])
    save("custom", **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"final_{i}": w for i, w in enumerate(final)})
    RESULTS["custom"] = {"losses": losses, "num_weights": len(init),
                         "set_weights": restored, "train_on_batch": first}


def run_die() -> None:
    pipe = pipeline("seq_1f1b_sgd")
    x, y = data()

    class Die(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if RANK == WORLD - 1 and batch == 1:
                os._exit(137)

    pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=50, shuffle=False, verbose=0,
             callbacks=[Die()])


def bad_index_pipeline() -> tuple:
    """The embedding pipeline, and data with an index out of range in the
    second batch (the first stage's lookup fails at run time)."""
    pipe = smd.PipelineModel(embedding_model(), num_stages=2, microbatches=2,
                             partition=EMBEDDING_PARTITION)
    pipe.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    x, y = embedding_data()
    x = x.copy()
    x[GLOBAL_BATCH + 1, 0] = 1000
    return pipe, x, y


def run_one_stage_fails(check: str) -> None:
    # One stage's step fails, the others' would wait for its messages:
    # "bad_target": targets of the wrong width, so only the last stage's
    # step fails to build (its loss); "bad_index": an embedding index out of
    # range in the second batch, so the first stage's op fails at run time.
    # The other stage's receive must fail soon after, naming the failed
    # rank, not at the watchdog's timeout.
    if check == "bad_target":
        pipe = pipeline("seq_1f1b_sgd")
        x, y = data()
        y = np.concatenate([y, y], 1)
    else:
        pipe, x, y = bad_index_pipeline()
    start = time.monotonic()
    try:
        pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        error = None
    except Exception as e:  # the rank's own error, whatever its type
        error = f"{type(e).__name__}: {e}"
    RESULTS[check] = {"error": error, "seconds": time.monotonic() - start}
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(RESULTS, f)
    time.sleep(10)  # the failed rank stays: the peer must not wait for its exit
    os._exit(0)


def run_uncaught() -> None:
    # A custom loop whose step fails at run time on the first stage (an
    # embedding index out of range in the second batch), with nothing
    # catching the error: the process must exit promptly (its peers are
    # waiting in a receive from it), not after the orderly shutdown waited
    # for them until the watchdog's timeout.
    pipe, x, y = bad_index_pipeline()

    @tf.function
    def step(xb, yb):
        loss, _, grads = pipe.compute_gradients(xb, yb)
        pipe.apply_gradients(grads)
        return loss

    for start in range(0, len(x), GLOBAL_BATCH):
        step(x[start:start + GLOBAL_BATCH], y[start:start + GLOBAL_BATCH])


def run_auto() -> None:
    pipe = pipeline("seq_1f1b_sgd", partition="auto")
    init = pipe.get_weights()
    x, y = data()
    seen = []
    profiler = smd.ProfilingCallback(warmup=1, repeats=2, on_profile=seen.append)
    history = pipe.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
                       verbose=0, callbacks=[profiler])
    final = pipe.get_weights()
    # The same callback in a second fit: no new profile, no new partition.
    pipe.fit(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH,
             epochs=1, verbose=0, callbacks=[profiler])
    save("auto", **{f"init_{i}": w for i, w in enumerate(init)},
         **{f"final_{i}": w for i, w in enumerate(final)})
    runtime = pipe._process.runtime
    # partition="auto" pending when weights and optimizer steps are loaded:
    # the first fit keeps the equal split (a new one would have to move the
    # loaded state between processes), with a warning.
    pipe.save_weights(os.path.join(OUT, "auto.weights.h5"))
    loaded = pipeline("seq_1f1b_sgd", partition="auto", seed=5)
    loaded.load_weights(os.path.join(OUT, "auto.weights.h5"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.fit(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH,
                   epochs=1, shuffle=False, verbose=0)
    RESULTS["auto_after_load"] = {
        "warned": any("keeps its current partition" in str(w.message) for w in caught),
        "stages": [[layer.name for layer in loaded._process.runtime.stage_layers(s)]
                   for s in range(2)]}
    RESULTS["auto"] = {
        "stages": [[layer.name for layer in runtime.stage_layers(s)]
                   for s in range(2)],
        "bandwidth": pipe._partition_options["bandwidth"],
        "loss": history.history["loss"], "num_weights": len(init),
        "hook_calls": len(seen), "profile_kwargs": profiler.profile_kwargs,
        "profile": seen[0].to_json() if seen else None}


def run_batchnorm() -> None:
    # One micro-batch, 2 pipelines: each pipeline's BatchNormalization sees
    # its half of the batch; their moving statistics are averaged.
    def net() -> keras.Model:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.BatchNormalization(name="bn")(
            keras.layers.Dense(8, name="a")(inputs))
        return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))

    x, y = data()
    pipe = smd.PipelineModel(net(), num_stages=2, microbatches=1, partition=[2, 1])
    pipe.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    pipe.fit(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH,
             epochs=1, shuffle=False, verbose=0)
    plain = net()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    plain.fit(x[:GLOBAL_BATCH], y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH,
              epochs=1, shuffle=False, verbose=0)
    bn = pipe.wrapped_model.get_layer("bn")
    RESULTS["batchnorm"] = {
        "local_mean": np.array(bn.moving_mean.value).tolist(),
        "plain_mean": np.array(plain.get_layer("bn").moving_mean.value).tolist(),
        "assembled": [w.tolist() for w in pipe.get_weights()],
    }


def run_example() -> None:
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples", "pipeline_hybrid.py")
    sys.argv = [example, "--epochs", "1", "--defer-weight-gradients"]
    runpy.run_path(example, run_name="__main__")


for check in CHECKS:
    {"mismatch": run_mismatch, "checkpoint": run_checkpoint, "example": run_example,
     "auto": run_auto, "embedding": run_embedding,
     "regularized": run_regularized, "two_outputs": run_two_outputs,
     "shuffled": run_shuffled, "mixed": run_mixed, "batchnorm": run_batchnorm,
     "custom": run_custom, "die": run_die,
     "bad_target": lambda: run_one_stage_fails("bad_target"),
     "bad_index": lambda: run_one_stage_fails("bad_index"),
     "uncaught": run_uncaught,
     }.get(check, lambda c=check: run_case(c))()
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(RESULTS, f)
