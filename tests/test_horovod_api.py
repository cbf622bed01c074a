"""The Horovod-compatible API in one process: surface, errors, exact equality."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist.horovod as hvd
import tf_smdist.horovod.keras as hvd_keras
import tf_smdist.sdp as sdp
import tf_smdist.sdp.keras as sdp_keras

hvd.init()

HVD_NAMES = """
init shutdown is_initialized size rank local_size local_rank cross_size cross_rank
is_homogeneous rank_op size_op local_rank_op local_size_op mpi_built mpi_enabled
mpi_threads_supported gloo_built gloo_enabled nccl_built ddl_built ccl_built cuda_built
rocm_built sycl_built start_timeline stop_timeline Average Sum Min Max Product Adasum
allreduce grouped_allreduce allgather grouped_allgather broadcast broadcast_
broadcast_variables alltoall reducescatter grouped_reducescatter join barrier
broadcast_object broadcast_object_fn allgather_object Compression ProcessSet
global_process_set add_process_set remove_process_set DistributedGradientTape
PartialDistributedGradientTape SyncBatchNormalization elastic DistributedOptimizer
broadcast_global_variables BroadcastGlobalVariablesHook process_set_included_op
""".split()
KERAS_NAMES = """
init shutdown size rank local_size local_rank mpi_built mpi_enabled
mpi_threads_supported gloo_built nccl_built cuda_built sycl_built Compression
DistributedOptimizer PartialDistributedOptimizer broadcast_global_variables
allreduce allgather broadcast load_model callbacks elastic Average Sum
""".split()
CALLBACK_NAMES = """
BroadcastGlobalVariablesCallback MetricAverageCallback LearningRateScheduleCallback
LearningRateWarmupCallback BestModelCheckpoint
""".split()
SDP_NAMES = """
init size rank local_rank local_size allreduce oob_allreduce broadcast
broadcast_variables DistributedGradientTape shutdown ReduceOp Compression
""".split()


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1)])


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.randn(n, 4).astype("float32")
    return x, (x @ np.arange(1, 5, dtype="float32"))[:, None]


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_every_documented_name_exists():
    for name in HVD_NAMES:
        assert hasattr(hvd, name), name
    for name in KERAS_NAMES:
        assert hasattr(hvd_keras, name), name
    for name in CALLBACK_NAMES:
        assert hasattr(hvd_keras.callbacks, name), name
    for name in SDP_NAMES:
        assert hasattr(sdp, name), name
    assert hasattr(sdp_keras, "DistributedOptimizer")
    assert hasattr(sdp_keras.callbacks, "BroadcastGlobalVariablesCallback")
    import tf_smdist

    assert tf_smdist.horovod is hvd and tf_smdist.sdp is sdp


def test_process_queries_in_one_process():
    assert hvd.is_initialized()
    assert (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()) == (0, 1, 0, 1)
    assert (hvd.cross_rank(), hvd.cross_size(), hvd.is_homogeneous()) == (0, 1, True)
    assert int(hvd.rank_op()) == 0 and int(hvd.size_op()) == 1
    assert int(hvd.local_rank_op()) == 0 and int(hvd.local_size_op()) == 1
    hvd.init()  # idempotent
    assert hvd.size() == 1


def test_build_queries_answer_truthfully():
    from tf_smdist import _build_info, _mpi_ops

    lib = os.path.join(os.path.dirname(_mpi_ops.__file__), _mpi_ops.LIBRARY_NAME)
    assert hvd.mpi_built() == os.path.exists(lib)
    assert hvd.mpi_enabled() is False  # one process: no MPI
    assert hvd.cuda_built() == bool(_build_info.GPU_KERNELS)
    assert hvd.gloo_built() is False and hvd.gloo_enabled() is False
    assert hvd.nccl_built() == 0
    assert not (hvd.ddl_built() or hvd.ccl_built() or hvd.rocm_built()
                or hvd.sycl_built() or hvd_keras.sycl_built())
    assert hvd.mpi_threads_supported() is False


def test_adasum_is_a_clear_error_everywhere():
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(tf.ones([2]), op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.grouped_allreduce([tf.ones([2])], op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.DistributedGradientTape(tf.GradientTape(), op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd_keras.DistributedOptimizer(keras.optimizers.SGD(), op=hvd.Adasum)


def test_op_and_legacy_average_conflict():
    with pytest.raises(ValueError, match="either `op` or the legacy `average`"):
        hvd.allreduce(tf.ones([1]), average=True, op=hvd.Sum)
    np.testing.assert_array_equal(hvd.allreduce(tf.ones([1]), average=False), [1.0])


def test_elastic_state_syncs_commits_and_restores_as_horovods():
    # Horovod's own test_elastic_state, on one rank.
    variables = [tf.Variable(np.full((2, 2), 1.0)), tf.Variable(np.full(2, 1.0))]
    state = hvd.elastic.TensorFlowState(variables, batch=20, epoch=10)
    state.sync()
    assert (state.batch, state.epoch) == (20, 10)
    changed = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros(2)]
    for v, w in zip(variables, changed):
        v.assign(w)
    state.batch, state.epoch = 21, 11
    state.restore()  # back to the last save (at creation)
    for v in variables:
        np.testing.assert_array_equal(v.numpy(), np.ones(v.shape))
    assert (state.batch, state.epoch) == (20, 10)
    for v, w in zip(variables, changed):
        v.assign(w)
    state.batch, state.epoch = 21, 11
    state.commit()
    state.restore()
    for v, w in zip(variables, changed):
        np.testing.assert_array_equal(v.numpy(), w)
    assert (state.batch, state.epoch) == (21, 11)


def test_keras_elastic_state_keeps_the_optimizer_and_run_retries_on_host_updates():
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    x, y = _data(16)
    model.fit(x, y, batch_size=8, verbose=0)  # Adam's moments exist
    state = hvd_keras.elastic.KerasState(model, epoch=0)
    saved = [np.array(v) for v in model.get_weights()]
    moments = [v.numpy() for v in model.optimizer.variables]
    model.fit(x, y, batch_size=8, verbose=0)
    state.restore()
    for a, b in zip(model.get_weights(), saved):
        np.testing.assert_array_equal(a, b)
    for v, b in zip(model.optimizer.variables, moments):
        np.testing.assert_array_equal(v.numpy(), b)

    # A host update interrupts at the next commit; run resets and calls the
    # function again; any other error propagates (no rank is replaced).
    resets = []
    state.register_reset_callbacks([lambda: resets.append(state.epoch)])

    @hvd_keras.elastic.run
    def train(state):
        state.epoch += 1
        if state.epoch == 1:
            state.on_hosts_updated(5.0)
        state.commit()
        return state.epoch

    assert train(state) == 2 and resets == [1]

    @hvd.elastic.run
    def failing(state):
        raise tf.errors.UnavailableError(None, None, "rank 1 is gone")

    with pytest.raises(tf.errors.UnavailableError, match="rank 1 is gone"):
        failing(state)
    with pytest.raises(ValueError, match="must be built"):
        hvd.elastic.TensorFlowKerasState(keras.Sequential([keras.layers.Dense(1)]))


def test_elastic_callbacks_track_batch_and_epoch_and_commit():
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    state = hvd_keras.elastic.KerasState(model, batch=0, epoch=0)
    commits = []
    state.save = lambda: commits.append((state.epoch, state.batch))
    batches = []

    class Seen(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(state.batch)

    x, y = _data(32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        hvd_keras.elastic.UpdateBatchStateCallback(state),
        hvd_keras.elastic.UpdateEpochStateCallback(state), Seen(),
        hvd_keras.elastic.CommitStateCallback(state, batches_per_commit=3)])
    assert batches == [0, 1, 2, 3] * 2
    assert (state.epoch, state.batch) == (2, 0)
    # Every 3 batches (counted across epochs), and at each epoch's end.
    assert commits == [(0, 2), (1, 0), (1, 1), (2, 0)]


def test_signatures_take_horovods_keywords():
    # Horovod 0.28's TF-level DistributedOptimizer takes scale_local_gradients
    # (and its TF1 wrapper register_local_var); PartialDistributedGradientTape
    # takes num_groups and groups before process_set and local_layers.
    opt = hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1),
                                   scale_local_gradients=False)
    opt.register_local_var(tf.Variable(1.0))
    hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), scale_local_gradients=False)
    layer = keras.layers.Dense(1)
    layer.build((None, 2))
    params = list(inspect.signature(hvd.PartialDistributedGradientTape).parameters)
    assert params[7:12] == ["num_groups", "groups", "process_set", "local_layers",
                            "scale_local_gradients"]
    hvd.PartialDistributedGradientTape(tf.GradientTape(), groups=[[layer.kernel]],
                                       local_layers=[layer])


def test_unsupported_communicator_and_timeline():
    with pytest.raises(ValueError, match="sub-communicator"):
        hvd.init(comm=[1, 2])
    hvd.init(comm=[0])  # the whole job is accepted
    # Horovod's switch for dynamic process sets (always on here).
    hvd.init(process_sets="dynamic")
    with pytest.raises(ValueError, match="'dynamic'"):
        hvd.init(process_sets="static")
    hvd.start_timeline("/tmp/unused.json")
    hvd.stop_timeline()


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.bfloat16])
def test_fp16_compression_round_trip(dtype):
    x = tf.constant([1.0, 1.0 / 3.0, 1000.5], dtype)
    sent, ctx = hvd.Compression.fp16.compress(x)
    assert sent.dtype == tf.float16
    back = hvd.Compression.fp16.decompress(sent, ctx)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tf.cast(tf.cast(x, tf.float16), dtype))
    ints = tf.constant([1, 2])
    sent, ctx = hvd.Compression.fp16.compress(ints)
    assert sent.dtype == tf.int32
    np.testing.assert_array_equal(hvd.Compression.fp16.decompress(sent, ctx), [1, 2])
    same, ctx = hvd.Compression.none.compress(x)
    assert same is x and hvd.Compression.none.decompress(same, ctx) is x
    reduced = hvd.allreduce(tf.constant([1.0 / 3.0]), compression=hvd.Compression.fp16)
    assert reduced.dtype == tf.float32
    np.testing.assert_array_equal(reduced, [np.float32(np.float16(1.0 / 3.0))])


def test_collectives_in_one_process_eager_function_and_graph():
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])

    def run(t):
        return [hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0, postscale_factor=3.0),
                hvd.allgather(t), hvd.broadcast(t, 0), hvd.alltoall(t),
                hvd.reducescatter(t, op=hvd.Sum), *hvd.grouped_allreduce([t, t]),
                *hvd.grouped_allgather([t]), *hvd.grouped_reducescatter([t])]

    expected = [6 * x, x, x, x, x, x, x, x, x]
    for out in (run(x), tf.function(run)(x)):
        for a, e in zip(out, expected):
            np.testing.assert_array_equal(a, e)
    with tf.Graph().as_default():
        t = tf.constant([1.0, 2.0])
        ops = [hvd.allreduce(t), hvd.allgather(t), hvd.broadcast(t, 0)]
        with tf.compat.v1.Session() as sess:
            for value in sess.run(ops):
                np.testing.assert_array_equal(value, [1.0, 2.0])
    assert int(hvd.join()) == 0
    hvd.barrier()


def test_indexed_slices_are_gathered_and_averaged():
    s = tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([3]),
                         tf.constant([5, 2]))
    out = hvd.allreduce(s)
    assert isinstance(out, tf.IndexedSlices)
    np.testing.assert_array_equal(out.values, [[1.0, 2.0]])
    np.testing.assert_array_equal(out.indices, [3])
    # As in Horovod, a gather takes no scale factors...
    for factors in ({"prescale_factor": 4.0}, {"postscale_factor": 0.5}):
        with pytest.raises(NotImplementedError, match="Pre/postscale_factor"):
            hvd.allreduce(s, **factors)
        with pytest.raises(NotImplementedError, match="Pre/postscale_factor"):
            hvd.grouped_allreduce([tf.ones([1]), s], **factors)
    # ... but gradient_predivide_factor's two factors cancel for a sparse
    # gradient, which the tape gathers unscaled.
    emb = tf.Variable(tf.ones([5, 2]))
    dense = tf.Variable(2.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(emb, [3, 3])) * dense
    tape = hvd.DistributedGradientTape(tape, gradient_predivide_factor=4.0)
    g_emb, g_dense = tape.gradient(loss, [emb, dense])
    assert isinstance(g_emb, tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(g_emb)[3], [4.0, 4.0])
    np.testing.assert_allclose(g_dense, 4.0)
    # Horovod raises NotImplementedError for the ops a gather cannot do.
    for op in (hvd.Min, hvd.Max, hvd.Product, hvd.Adasum):
        with pytest.raises(NotImplementedError):
            hvd.allreduce(s, op=op)
        with pytest.raises(NotImplementedError):
            hvd.grouped_allreduce([s, tf.ones([1])], op=op)
    # Average is Horovod's true division: integer values come back as float64.
    ints = tf.IndexedSlices(tf.constant([[3, -7]]), tf.constant([1]))
    avg = hvd.allreduce(ints, op=hvd.Average)
    assert avg.values.dtype == tf.float64
    np.testing.assert_array_equal(avg.values, [[3.0, -7.0]])
    assert hvd.allreduce(ints, op=hvd.Sum).values.dtype == tf.int32


def test_reducescatter_scales_integers_in_float64():
    # Horovod's op scales integer tensors in float64 (the factor is not
    # truncated to the tensor's dtype first).
    t = tf.constant([4, 7])
    np.testing.assert_array_equal(
        hvd.reducescatter(t, op=hvd.Sum, prescale_factor=0.5), [2, 3])
    np.testing.assert_array_equal(
        hvd.grouped_reducescatter([t], op=hvd.Sum, postscale_factor=1.5)[0], [6, 10])


def test_alltoall_returns_the_splits_only_when_given():
    t = tf.constant([[1, 2], [3, 4]])
    out = hvd.alltoall(t)
    assert isinstance(out, tf.Tensor)
    np.testing.assert_array_equal(out, t)
    out, received = hvd.alltoall(t, splits=[2])
    np.testing.assert_array_equal(out, t)
    np.testing.assert_array_equal(received, [2])
    np.testing.assert_array_equal(tf.function(hvd.alltoall)(t), t)


def test_broadcast_inplace_in_a_graph_returns_the_assigned_values():
    with tf.Graph().as_default():
        v = tf.compat.v1.Variable([1.0, 2.0])
        out, = hvd.broadcast_([v], root_rank=0)
        assert isinstance(out, tf.Tensor)
        with tf.compat.v1.Session() as sess:
            sess.run(v.initializer)
            np.testing.assert_array_equal(sess.run(out), [1.0, 2.0])
    v = tf.Variable([3.0])
    assert hvd.broadcast_(v, root_rank=0) is v


def test_object_collectives():
    fn = lambda v: v + 1  # noqa: E731 (a lambda needs cloudpickle)
    obj = {"a": [1, 2.5, "x"], "f": fn}
    got = hvd.broadcast_object(obj, root_rank=0)
    assert got["a"] == obj["a"] and got["f"](1) == 2
    assert hvd.broadcast_object_fn(root_rank=0)((1, None)) == (1, None)
    assert hvd.allgather_object({"rank": hvd.rank()}) == [{"rank": 0}]


def test_object_collectives_in_a_tf1_graph_run_in_the_session():
    # As in Horovod: the given session, else the default one, runs them.
    with tf.Graph().as_default():
        with tf.compat.v1.Session() as sess:
            assert hvd.broadcast_object({"a": 1}, session=sess) == {"a": 1}
            assert hvd.allgather_object("x", session=sess) == ["x"]
            with sess.as_default():
                assert hvd.broadcast_object_fn(root_rank=0)([2]) == [2]
        with pytest.raises(RuntimeError, match="session=sess"):
            hvd.broadcast_object(1)
    with pytest.raises(RuntimeError, match="tf.function"):
        tf.function(lambda: hvd.allgather_object(1))()


def test_process_sets_in_one_process():
    # In one process every set is the global set's twin: Horovod refuses to
    # add it (ValueError) and init(process_sets=...) leaves it unregistered.
    with pytest.raises(ValueError, match="duplicate process set"):
        hvd.add_process_set([0])
    ps = hvd.ProcessSet([0])
    hvd.init(process_sets=[ps])
    assert ps.process_set_id is None and ps.ranks == [0] and ps.included()
    assert hvd.mpi_ops.process_set_table() == {0: [0]}
    assert int(hvd.process_set_included_op(0)) == 1
    assert hvd.process_set_included_op().dtype == tf.int32
    np.testing.assert_array_equal(
        hvd.allreduce(tf.ones([2]), process_set=hvd.global_process_set), [1, 1])
    assert hvd.remove_process_set(ps) is False
    assert hvd.remove_process_set(hvd.global_process_set) is False
    with pytest.raises(ValueError, match="not registered"):
        hvd.allreduce(tf.ones([2]), process_set=ps)
    with pytest.raises(ValueError, match="ranks of the job"):
        hvd.add_process_set([0, 1])
    # Horovod's spelling of a set.
    assert str(hvd.global_process_set) == (
        "ProcessSet(process_set_id=0, ranks=[0], mpi_comm=None)")
    assert repr(ps) == "ProcessSet(process_set_id=None, ranks=[0], mpi_comm=None)"
    with pytest.raises(TypeError, match="ProcessSet"):
        hvd.allreduce(tf.ones([1]), process_set=[0])
    assert hvd.global_process_set.process_set_id == 0
    assert hvd.global_process_set.size() == 1


def _tape_grads(tape_cls, **kwargs):
    model = _model()
    x, y = _data(16)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    if tape_cls is not None:
        tape = tape_cls(tape, **kwargs)
    return [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("kwargs", [{}, {"groups": 2}, {"num_groups": 1},
                                    {"op": hvd.Sum}])
def test_tape_equals_plain_tape_in_one_process(kwargs):
    _equal(_tape_grads(hvd.DistributedGradientTape, **kwargs), _tape_grads(None))


def test_tape_as_context_local_sources_and_sparse():
    emb = keras.layers.Embedding(10, 3)
    emb.build((None,))
    dense = keras.layers.Dense(1)
    ids = tf.constant([1, 4, 4])
    with hvd.DistributedGradientTape(tf.GradientTape(), sparse_as_dense=False) as tape:
        loss = tf.reduce_sum(dense(emb(ids)))
    tape.register_local_source(dense.kernel)
    g_emb, g_kernel = tape.gradient(loss, [emb.embeddings, dense.kernel])
    assert isinstance(g_emb, tf.IndexedSlices)
    with tf.GradientTape() as plain:
        loss = tf.reduce_sum(dense(emb(ids)))
    p_emb, p_kernel = plain.gradient(loss, [emb.embeddings, dense.kernel])
    np.testing.assert_array_equal(tf.convert_to_tensor(g_emb),
                                  tf.convert_to_tensor(p_emb))
    np.testing.assert_array_equal(g_kernel, p_kernel)
    with hvd.DistributedGradientTape(tf.GradientTape(), sparse_as_dense=True) as tape:
        loss = tf.reduce_sum(dense(emb(ids)))
    dense_grad = tape.gradient(loss, emb.embeddings)
    assert isinstance(dense_grad, tf.Tensor)
    np.testing.assert_array_equal(dense_grad, tf.convert_to_tensor(p_emb))
    partial = hvd.PartialDistributedGradientTape(tf.GradientTape(), local_layers=dense)
    assert partial.tape is not None
    with pytest.raises(TypeError, match="tf.GradientTape"):
        hvd.DistributedGradientTape(object())


def _fit(optimizer, callbacks=(), epochs=2, batch_size=16, model=None):
    model = model or _model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _data()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                        shuffle=False, callbacks=list(callbacks))
    return model, history


@pytest.mark.parametrize("make", [lambda: keras.optimizers.SGD(0.05, momentum=0.9),
                                  lambda: keras.optimizers.Adam(0.01)])
def test_distributed_optimizer_fit_equals_plain_fit(make):
    plain, _ = _fit(make())
    callbacks = [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd_keras.callbacks.MetricAverageCallback()]
    opt = hvd_keras.DistributedOptimizer(make())
    dist, history = _fit(opt, callbacks)
    _equal(dist.get_weights(), plain.get_weights())
    assert isinstance(opt, type(make())) and hvd_keras.is_distributed(opt)
    config, plain_config = opt.get_config(), make().get_config()
    config.pop("name"), plain_config.pop("name")
    assert config == plain_config
    assert len(history.history["loss"]) == 2


def test_compile_takes_tf_keras_experimental_run_tf_function(tmp_path):
    # Horovod's Keras examples compile with tf.keras 2's argument, which
    # Keras 3 alone rejects; it is dropped, any other unknown one still fails.
    x, y = _data()
    model = _model()
    model.compile(optimizer=hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1)),
                  loss="mse", metrics=["mae"], experimental_run_tf_function=False)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and "mae" in history.history
    plain = _model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["mae"])
    plain.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="not_an_argument"):
        _model().compile(optimizer="sgd", loss="mse", not_an_argument=1)
    hvd.init()  # again: the wrapper is not stacked
    assert not getattr(keras.Model.compile.__wrapped__,
                       "_smdist_tf_keras_spelling", False)
    # Keras still compiles the models it loads (it skips models whose class
    # overrides `compile`).
    plain.save(tmp_path / "plain.keras")
    loaded = keras.models.load_model(tmp_path / "plain.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)


def test_compile_keeps_xla_off_for_a_distributed_optimizer(monkeypatch):
    # Keras 3's jit_compile="auto" turns XLA on when the machine has a GPU
    # and no tf.distribute strategy trains the model; XLA cannot compile the
    # host all-reduce ops. Pretend there is a GPU: a plain optimizer then
    # gets XLA, a distributed one does not, and asking for it is an error.
    real = tf.config.list_physical_devices
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [*real(kind), gpu] if kind in (None, "GPU")
                        else real(kind))
    plain = _model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert plain.jit_compile is True  # the pretence works
    for wrap in (lambda o: o, keras.optimizers.LossScaleOptimizer):
        model = _model()
        model.compile(optimizer=wrap(hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1))),
                      loss="mse")
        assert model.jit_compile is False
    model = _model()
    model.compile(hvd.DistributedOptimizer(keras.optimizers.SGD(0.1)), "mse",
                  None, None, None, False, 1, "auto")  # jit_compile positional
    assert model.jit_compile is False
    with pytest.raises(ValueError, match="jit_compile=True cannot compile"):
        _model().compile(optimizer=hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1)),
                         loss="mse", jit_compile=True)


def test_tensorflow_level_distributed_optimizer():
    # Keras 3 optimizers go to the Keras wrapper; TF1 optimizers are wrapped
    # for tf.compat.v1 graphs (one process: the plain optimizer's result).
    keras_opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), op=hvd.Sum)
    assert isinstance(keras_opt, keras.optimizers.SGD)
    assert hvd_keras.is_distributed(keras_opt)

    def train(distributed: bool) -> tuple[np.ndarray, list[str]]:
        with tf.Graph().as_default():
            w = tf.compat.v1.get_variable("w", initializer=[[1.0], [-2.0]])
            loss = tf.reduce_sum(tf.square(tf.constant([[1.0, 3.0]]) @ w - 1.0))
            opt = tf.compat.v1.train.AdamOptimizer(0.05)
            if distributed:
                opt = hvd.DistributedOptimizer(opt, name="Dist")
                assert opt.get_name() == "Dist"
            step = opt.minimize(loss)
            slots = opt.get_slot_names()
            assert opt.get_slot(w, "m") is not None
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                for _ in range(5):
                    sess.run(step)
                return sess.run(w), slots

    (plain, plain_slots), (dist, dist_slots) = train(False), train(True)
    np.testing.assert_allclose(dist, plain, rtol=1e-6)
    assert dist_slots == plain_slots and not np.allclose(plain, [[1.0], [-2.0]])
    with pytest.raises(ValueError, match="tf.compat.v1.train.Optimizer"):
        hvd.DistributedOptimizer(object())
    with pytest.raises(NotImplementedError, match="backward_passes_per_step"):
        hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1),
                                 backward_passes_per_step=2)
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1),
                                 op=hvd.Sum, gradient_predivide_factor=2.0)


def test_optimizer_variables_also_answer_a_call():
    # tf.keras 2's `opt.variables()` (Horovod's examples broadcast it) and
    # Keras 3's `opt.variables` give the same list.
    model = _model()
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    for opt in (keras.optimizers.Adam(0.1), hvd_keras.DistributedOptimizer(sgd)):
        opt.build(model.trainable_variables)
        listed, called = opt.variables, opt.variables()
        assert isinstance(listed, list) and len(listed) > len(model.trainable_variables)
        assert [v.path for v in called] == [v.path for v in listed]
        assert listed == list(listed) and listed[:] == listed
    before = [v.numpy() for v in opt.variables]

    @tf.function
    def broadcast():
        hvd.broadcast_variables(opt.variables(), root_rank=0)

    broadcast()
    for a, v in zip(before, opt.variables):
        np.testing.assert_array_equal(a, v.numpy())


def test_distributed_optimizer_custom_loop_apply_gradients():
    x, y = _data(16)
    results = []
    for wrap in (False, True):
        model = _model()
        opt = keras.optimizers.SGD(0.1)
        if wrap:
            opt = hvd_keras.DistributedOptimizer(opt, name="dist_sgd")
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
        results.append(model.get_weights())
    _equal(results[0], results[1])
    assert opt.name == "dist_sgd"
    with pytest.raises(ValueError, match="already"):
        hvd_keras.DistributedOptimizer(opt)
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        hvd_keras.DistributedOptimizer("sgd")


def test_backward_passes_per_step_accumulates_locally():
    # Two half batches summed (or averaged) locally then applied once
    # equal one step on the whole batch with the loss summed (or averaged).
    x, y = _data(32)
    for average in (True, False):
        model = _model()
        opt = hvd_keras.DistributedOptimizer(
            keras.optimizers.SGD(0.05), backward_passes_per_step=2,
            average_aggregated_gradients=average)
        for half in (slice(0, 16), slice(16, 32)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x[half]) - y[half]))
            opt.apply(tape.gradient(loss, model.trainable_variables),
                      model.trainable_variables)
        ref = _model()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ref(x) - y)) * (1.0 if average else 2.0)
        keras.optimizers.SGD(0.05).apply(tape.gradient(loss, ref.trainable_variables),
                                         ref.trainable_variables)
        for a, b in zip(model.get_weights(), ref.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert int(opt.iterations) == 2


def test_a_copy_from_config_is_distributed_with_the_same_options():
    # As in Horovod, the optimizer's class holds the call's options: a copy
    # made through from_config (Keras' and Horovod's own test do that)
    # accumulates two passes too, and an optimizer of another call keeps its own.
    opt = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(1.0),
                                         backward_passes_per_step=2)
    other = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(1.0))
    for copy in (opt.from_config(opt.get_config()),
                 type(opt).from_config(opt.get_config())):
        assert hvd_keras.is_distributed(copy) and isinstance(copy, keras.optimizers.SGD)
        v = tf.Variable([1.0])
        copy.apply_gradients([(tf.constant([0.5]), v)])
        np.testing.assert_array_equal(v.numpy(), [1.0])  # first pass: accumulated
        copy.apply_gradients([(tf.constant([0.5]), v)])
        np.testing.assert_array_equal(v.numpy(), [0.0])
    v = tf.Variable([1.0])
    copy = type(other).from_config(other.get_config())
    copy.apply_gradients([(tf.constant([0.5]), v)])
    np.testing.assert_array_equal(v.numpy(), [0.5])


def test_horovods_util_helpers_that_its_tests_import():
    from tf_smdist.horovod.util import _cache, _executing_eagerly, _make_subgraph

    assert hvd._executing_eagerly is _executing_eagerly
    assert _executing_eagerly()
    assert not bool(tf.function(lambda: tf.constant(_executing_eagerly()))())
    calls = []
    twice = _cache(lambda a: calls.append(a) or a * 2)
    assert twice(3) == twice(3) == 6 and calls == [3]
    assert float(_make_subgraph(lambda t: t + 1)(tf.constant(1.0))) == 2.0


def test_load_model_wraps_the_optimizer_and_keeps_its_state(tmp_path):
    model, _ = _fit(keras.optimizers.SGD(0.05, momentum=0.9))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = hvd_keras.load_model(path)
    assert hvd_keras.is_distributed(loaded.optimizer)
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 8
    _equal([v.numpy() for v in loaded.optimizer.variables],
           [v.numpy() for v in model.optimizer.variables])
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    _equal(loaded.get_weights(), model.get_weights())


def test_learning_rate_callbacks(tmp_path):
    schedule = hvd_keras.callbacks.LearningRateScheduleCallback(
        initial_lr=0.1, multiplier=lambda epoch: 0.5 ** epoch, start_epoch=1)
    _, history = _fit(keras.optimizers.SGD(0.1), [schedule], epochs=3)
    np.testing.assert_allclose(history.history["lr"], [0.1, 0.05, 0.025], rtol=1e-6)
    # One process: the warm-up multiplier is 1 (initial_lr / size ... initial_lr).
    warmup = hvd_keras.callbacks.LearningRateWarmupCallback(
        initial_lr=0.2, warmup_epochs=2, verbose=1)
    _, history = _fit(keras.optimizers.SGD(0.05), [warmup], epochs=2)
    np.testing.assert_allclose(history.history["lr"], [0.2, 0.2], rtol=1e-6)
    best = str(tmp_path / "best.keras")
    checkpoint = hvd_keras.callbacks.BestModelCheckpoint(monitor="loss", filepath=best)
    _fit(keras.optimizers.SGD(0.05), [checkpoint], epochs=1)
    assert os.path.exists(best)
    with pytest.raises(ValueError, match="filepath"):
        hvd_keras.callbacks.BestModelCheckpoint()


def test_sync_batch_norm_equals_batch_norm_in_one_process():
    x = tf.random.stateless_normal([16, 3], seed=[1, 2]) * 3.0 + 1.0
    sync = hvd.SyncBatchNormalization(momentum=0.5)
    plain = keras.layers.BatchNormalization(momentum=0.5)
    outs, grads = [], []
    for layer in (sync, plain):
        layer.build(x.shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * tf.range(3, dtype=tf.float32))
        grads.append(tape.gradient(loss, [x, *layer.trainable_variables]))
        outs.append(out)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sync.moving_mean, plain.moving_mean, rtol=1e-5)
    np.testing.assert_allclose(sync.moving_variance, plain.moving_variance, rtol=1e-5)
    np.testing.assert_allclose(sync(x, training=False), plain(x, training=False),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="renorm"):
        hvd.SyncBatchNormalization(renorm=True)


def test_broadcast_variables_and_global_variables():
    v = tf.Variable([1.0, 2.0])
    w = keras.Variable(np.ones((2, 2), "float32"))
    assert hvd.broadcast_variables([v, w], root_rank=0) is None
    assert hvd.broadcast_(v, 0) is v
    with pytest.raises(RuntimeError, match="eager"):
        hvd.broadcast_global_variables(0)
    with pytest.raises(RuntimeError, match="eager"):
        hvd_keras.broadcast_global_variables(0)
    with tf.Graph().as_default():
        g = tf.compat.v1.get_variable("g", initializer=[3.0])
        op = hvd.broadcast_global_variables(0)
        with tf.compat.v1.Session() as sess:
            sess.run(g.initializer)
            sess.run(op)
            np.testing.assert_array_equal(sess.run(g), [3.0])


def test_keras_level_collectives_return_tensors_as_horovod():
    # Horovod's Keras collectives return the op's result as it is when
    # TensorFlow runs eagerly (a test's self.evaluate(...) or `.numpy()` on
    # it), and run it in the default session of a TF1 graph.
    out = hvd_keras.allreduce(np.array([1.0, 3.0]), op=hvd.Sum)
    assert isinstance(out, tf.Tensor)
    np.testing.assert_array_equal(out.numpy(), [1.0, 3.0])
    np.testing.assert_array_equal(hvd_keras.allgather(np.arange(3)).numpy(),
                                  np.arange(3))
    np.testing.assert_array_equal(hvd_keras.broadcast(np.array([7]), 0).numpy(), [7])
    np.testing.assert_array_equal(
        hvd_keras.reducescatter(np.array([2.0, 4.0]), op=hvd.Sum).numpy(), [2.0, 4.0])
    traced = tf.function(lambda x: hvd_keras.allreduce(x, name="traced"))
    np.testing.assert_array_equal(traced(tf.constant([5.0])), [5.0])
    with tf.Graph().as_default(), tf.compat.v1.Session():
        np.testing.assert_array_equal(
            hvd_keras.allreduce([2.0], name="in_session"), [2.0])


def test_sdp_spelling():
    sdp.init()
    assert sdp.size() == 1 and sdp.rank() == 0
    assert os.environ.get("SMDIST_FUSION_THRESHOLD") or os.environ.get(
        "HOROVOD_FUSION_THRESHOLD")
    assert sdp.DEFAULT_FUSION_BYTES == 25 * 1024 * 1024
    assert sdp.ReduceOp.AVERAGE == hvd.Average and sdp.ReduceOp.SUM == hvd.Sum
    np.testing.assert_array_equal(sdp.allreduce(tf.constant([2.0]), 0, 1), [2.0])
    with pytest.raises(ValueError, match="param_index"):
        sdp.allreduce(tf.constant([2.0]), 3, 2)
    np.testing.assert_array_equal(sdp.oob_allreduce(tf.constant([5])), [5])
    plain, _ = _fit(keras.optimizers.SGD(0.05))
    dist, _ = _fit(sdp_keras.DistributedOptimizer(keras.optimizers.SGD(0.05)),
                   [sdp_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    _equal(dist.get_weights(), plain.get_weights())


@pytest.mark.parametrize("module", [
    "tf_smdist.horovod", "tf_smdist.horovod.basics", "tf_smdist.horovod.collectives",
    "tf_smdist.horovod.compression", "tf_smdist.horovod.objects",
    "tf_smdist.horovod.process_sets", "tf_smdist.horovod.tape",
    "tf_smdist.horovod.gradients", "tf_smdist.horovod.sync_batch_norm",
    "tf_smdist.horovod.global_variables", "tf_smdist.horovod.elastic",
    "tf_smdist.horovod.functions",
    "tf_smdist.horovod.keras", "tf_smdist.horovod.keras.optimizer",
    "tf_smdist.horovod.keras.elastic",
    "tf_smdist.horovod.keras.callbacks", "tf_smdist.sdp", "tf_smdist.sdp.keras",
])
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    failures, _ = doctest.testmod(
        mod, extraglobs={"tf": tf, "np": np, "keras": keras},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0
