"""What the pipeline-across-processes worker and its plain-Keras reference share."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

NUM_SAMPLES = 64
GLOBAL_BATCH = 16

# name -> (model, stages K, micro-batches M, schedule, optimizer, partition,
#          placement, epochs); partitions cut the skip model so that its skip
#          connection crosses a cut (with 3+ stages, several cuts).
CASES = {
    "seq_1f1b_sgd": ("seq", 2, 4, "1f1b", "sgd", [2, 2], "cluster", 2),
    # The custom loop's (global_clipnorm through pipe.apply_gradients).
    "seq_1f1b_sgd_clip": ("seq", 2, 4, "1f1b", "sgd_clip", [2, 2], "cluster", 2),
    "skip_gpipe_adam": ("skip", 2, 2, "gpipe", "adam", [1, 4], "cluster", 1),
    "skip_interleaved_sgd": ("skip", 2, 2, "interleaved", "momentum_clip",
                             [1, 1, 1, 2], "cluster", 1),
    "skip3_1f1b_adam": ("skip", 3, 4, "1f1b", "adam", [1, 1, 3], "cluster", 1),
    "seq_hybrid_cluster": ("seq", 2, 2, "1f1b", "adam", [2, 2], "cluster", 1),
    "skip_hybrid_spread": ("skip", 2, 2, "interleaved", "sgd_clip", [1, 1, 1, 2],
                           "spread", 1),
    # gradient_accumulation_steps=3 over 4 steps per epoch: Keras clips the
    # accumulated mean at update steps only, by the whole model's norm.
    "seq_hybrid_accumulate_clip": ("seq", 2, 2, "1f1b", "adam_accumulate_clip",
                                   [2, 2], "cluster", 2),
    # With defer_weight_gradients=True (see DEFERRED).
    "skip_1f1b_adam_defer": ("skip", 2, 4, "1f1b", "adam", [2, 3], "cluster", 1),
    "skip_interleaved_defer": ("skip", 2, 4, "interleaved", "momentum",
                               [1, 1, 1, 2], "cluster", 1),
    # use_ema=True: fit ends with the moving averages in the variables.
    "seq_1f1b_adam_ema": ("seq", 2, 4, "1f1b", "adam_ema", [2, 2], "cluster", 2),
    # AdamW with exclude_from_weight_decay, which is not in get_config: the
    # copy of the built optimizer that partitioning at the first batch makes
    # from its config used to lose it.
    "seq_1f1b_adamw_exclude": ("seq", 2, 4, "1f1b", "adamw_exclude", "auto",
                               "cluster", 1),
}
# Cases run with the dense layers' weight gradients deferred to one product
# per step.
DEFERRED = ("skip_1f1b_adam_defer", "skip_interleaved_defer")
# Cases that also check evaluate and predict (each traces more functions).
EVALUATED = ("seq_1f1b_sgd", "skip3_1f1b_adam", "skip_hybrid_spread")
# Cases that also save and load their optimizer state (save_weights).
SAVED = ("seq_hybrid_cluster", "seq_1f1b_adam_ema")


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((NUM_SAMPLES, 6)).astype(np.float32)
    y = rng.standard_normal((NUM_SAMPLES, 3)).astype(np.float32)
    return x, y


def model(kind: str, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    if kind == "seq":
        return keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3),
        ])
    inputs = keras.Input((6,))
    a = keras.layers.Dense(8, activation="tanh", name="a")(inputs)
    b = keras.layers.Dense(8, activation="tanh", name="b")(a)
    c = keras.layers.Dense(8, activation="tanh", name="c")(b)
    joined = keras.layers.Concatenate(name="join")([c, a])  # skip a -> join
    outputs = keras.layers.Dense(3, name="out")(joined)
    return keras.Model(inputs, outputs)


def optimizer(name: str) -> keras.optimizers.Optimizer:
    # "_clip": clipped to a global norm that every step here exceeds, which
    # each stage's own norm would not reproduce.
    kwargs = {"global_clipnorm": 0.05} if name.endswith("_clip") else {}
    name = name.removesuffix("_clip")
    if name == "sgd":
        return keras.optimizers.SGD(0.1, **kwargs)
    if name == "momentum":
        return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)
    if name == "adam_accumulate":
        return keras.optimizers.Adam(0.01, gradient_accumulation_steps=3, **kwargs)
    if name == "adam_ema":
        return keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.8, **kwargs)
    if name == "adamw_exclude":
        adamw = keras.optimizers.AdamW(0.01, weight_decay=0.5, **kwargs)
        adamw.exclude_from_weight_decay(var_names=["kernel"])
        return adamw
    return keras.optimizers.Adam(0.01, **kwargs)


def reference_model(case: str, init: list[np.ndarray],
                    epochs: int | None = None) -> tuple[keras.Model, list]:
    """The plain model trained on the same global batches (mean loss); its losses."""
    kind, _, _, _, opt, _, _, case_epochs = CASES[case]
    epochs = epochs or case_epochs
    net = model(kind)
    net.set_weights(init)
    net.compile(optimizer=optimizer(opt), loss="mse")
    x, y = data()
    history = net.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs,
                      shuffle=False, verbose=0)
    return net, history.history["loss"]


def reference(case: str, init: list[np.ndarray],
              epochs: int | None = None) -> tuple[list, list]:
    """The plain model's weights and losses (see `reference_model`)."""
    net, losses = reference_model(case, init, epochs)
    return net.get_weights(), losses


# An embedding model: its gradient is a tf.IndexedSlices with repeated rows
# (20 tokens, 16 x 7 per batch), which Keras' Adam treats otherwise than the
# dense sum, so a pipeline must hand the optimizer the same slices.
EMBEDDING_PARTITION = [2, 3]
EMBEDDING_CLIP = 0.05  # a global_clipnorm every step here exceeds


def embedding_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 4)(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    h = keras.layers.Dense(8, activation="tanh")(h)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


def embedding_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return (rng.integers(0, 20, (NUM_SAMPLES, 7)).astype(np.int32),
            rng.integers(0, 3, NUM_SAMPLES).astype(np.int32))


def embedding_reference(init: list[np.ndarray], **options) -> tuple[list, list]:
    """The plain embedding model trained with Adam(0.01, **options) on the
    same global batches."""
    net = embedding_model()
    net.set_weights(init)
    net.compile(optimizer=keras.optimizers.Adam(0.01, **options),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = embedding_data()
    history = net.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False,
                      verbose=0)
    return net.get_weights(), history.history["loss"]


# Two outputs, one of them from a middle stage, with losses and metrics by
# output name: Keras names the history's entries after the outputs.
TWO_OUTPUT_PARTITION = [1, 2, 2]


def two_output_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    a = keras.layers.Dense(8, activation="tanh", name="a")(inputs)
    b = keras.layers.Dense(8, activation="tanh", name="b")(a)
    aux = keras.layers.Dense(2, name="aux")(b)
    c = keras.layers.Dense(8, activation="tanh", name="c")(b)
    main = keras.layers.Dense(3, name="main")(c)
    return keras.Model(inputs, {"main": main, "aux": aux})


def two_output_compile() -> dict:
    return dict(optimizer=keras.optimizers.SGD(0.1),
                loss={"main": "mse", "aux": "mae"},
                loss_weights={"main": 1.0, "aux": 0.3},
                metrics={"main": ["mae"]})


def two_output_data() -> tuple[np.ndarray, dict]:
    x, y = data()
    rng = np.random.default_rng(4)
    aux = rng.standard_normal((NUM_SAMPLES, 2)).astype(np.float32)
    return x, {"main": y, "aux": aux}


def two_output_reference(init: list[np.ndarray]) -> tuple[list, dict, dict]:
    """The plain two-output model's weights, history and evaluation."""
    net = two_output_model()
    net.set_weights(init)
    net.compile(**two_output_compile())
    x, y = two_output_data()
    history = net.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False,
                      verbose=0)
    evaluated = net.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0,
                             return_dict=True)
    return net.get_weights(), history.history, evaluated


# Weight regularizers on both stages (L2 and L1L2 kernels, an L1 bias), a
# skip across the cut: Keras adds their penalties to the loss once per step.
REGULARIZED_PARTITION = [2, 3]


def regularized_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(0.05)
    inputs = keras.Input((6,))
    a = keras.layers.Dense(8, activation="tanh", name="a",
                           kernel_regularizer=l2)(inputs)
    b = keras.layers.Dense(8, activation="tanh", name="b",
                           bias_regularizer=keras.regularizers.L1(0.05))(a)
    c = keras.layers.Dense(8, activation="tanh", name="c",
                           kernel_regularizer=keras.regularizers.L1L2(0.02, 0.05))(b)
    joined = keras.layers.Concatenate(name="join")([c, a])
    outputs = keras.layers.Dense(3, name="out", kernel_regularizer=l2)(joined)
    return keras.Model(inputs, outputs)


def regularized_reference(init: list[np.ndarray]) -> dict:
    """The plain regularized model: `fit` (Adam, one epoch), `evaluate`, then
    one custom step on the first batch (the loss with its penalties)."""
    net = regularized_model()
    net.set_weights(init)
    net.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = data()
    history = net.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
                      verbose=0)
    evaluated = net.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0)
    fitted = net.get_weights()
    with tf.GradientTape() as tape:
        loss = net.compute_loss(y=y[:GLOBAL_BATCH],
                                y_pred=net(x[:GLOBAL_BATCH], training=True))
    net.optimizer.apply(tape.gradient(loss, net.trainable_variables),
                        net.trainable_variables)
    return {"loss": history.history["loss"], "evaluate": evaluated,
            "fitted": fitted, "custom_loss": float(loss), "final": net.get_weights()}
