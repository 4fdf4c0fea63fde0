"""Builds small trained-model files the way TensorFlow users make them, for tests/test_tf_import.py.

Run as a child process (``python tests/tf_models.py OUT_DIR [--legacy]``) so TensorFlow's global
state stays out of the test process; with ``--legacy`` it runs under TF_USE_LEGACY_KERAS=1 and
writes a tf.keras 2 ``.h5`` that Keras 3 cannot deserialise. The models are functional, one
``keras.Sequential`` and one ``keras.Model`` subclass. For each it writes .keras, .h5, a
SavedModel (``model.export``) and .tflite (the functional ones also a dynamic-range .tflite and
tf2onnx's ONNX), and ``NAME.npz`` (``NAME_legacy.npz``) with random inputs (NHWC or (N, F)) and
the reference outputs (logits: the output before a final Softmax) and the names of the layers
with weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _models(keras):
    layers = keras.layers

    def cnn():
        """SAME stride 2 and 1, VALID, depthwise, BatchNorm, ReLU/ReLU6, Add, pooling, dense, softmax."""
        inp = keras.Input((16, 16, 3))
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, strides=2, padding="same")(inp)))
        y = layers.ReLU(6.0)(layers.DepthwiseConv2D(3, padding="same")(x))
        x = layers.Add()([x, layers.Conv2D(8, 1)(y)])
        x = layers.Conv2D(16, 3, padding="valid", activation="relu")(x)
        x = layers.AveragePooling2D(2)(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(128, activation="relu")(x)  # 2,048 weights: dynamic-range quantises it
        return keras.Model(inp, layers.Softmax()(layers.Dense(10)(x)))

    def kws():
        """MLPerf Tiny's DS-CNN shape: a (10, 4) stride-2 SAME conv pads [4, 1, 5, 1], pool, flatten."""
        inp = keras.Input((49, 10, 1))
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, (10, 4), strides=2, padding="same")(inp)))
        x = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(x)))
        x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 1)(x)))
        x = layers.Flatten()(layers.AveragePooling2D(pool_size=(25, 5))(x))
        return keras.Model(inp, layers.Softmax()(layers.Dense(12)(x)))

    def autoencoder():
        """A dense autoencoder on a 2-D input (MLPerf Tiny's anomaly detection shape, smaller)."""
        inp = keras.Input((20,))
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(8)(inp)))
        x = layers.Dense(4, activation="relu")(x)
        return keras.Model(inp, layers.Dense(20)(x))

    def sigmoid():
        inp = keras.Input((8, 8, 1))
        x = layers.Flatten()(layers.Conv2D(2, 3, activation="sigmoid")(inp))
        return keras.Model(inp, layers.Dense(2)(x))

    def flatten_dense():
        """Keras' common head: a feature map larger than 1x1 flattened (in H, W, C order) into a Dense."""
        inp = keras.Input((6, 6, 2))
        x = layers.Flatten()(layers.Conv2D(3, 3, activation="relu")(inp))
        return keras.Model(inp, layers.Dense(4)(x))

    def rescaled():
        """A Sequential that scales its own input: Rescaling to -1..1, then a per-channel Normalization."""
        return keras.Sequential([
            keras.Input((8, 8, 3)), layers.Rescaling(1 / 127.5, offset=-1.0),
            layers.Normalization(mean=[0.1, -0.2, 0.3], variance=[0.25, 0.5, 1.0]),
            layers.Conv2D(4, 3, padding="same", activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(3)])

    def sequential():
        """A CNN as a ``keras.Sequential`` (tf2onnx's from_keras fails on it: KeyError 'keras_tensor_NN')."""
        return keras.Sequential([
            keras.Input((16, 16, 3)), layers.Conv2D(8, 3, strides=2, padding="same"), layers.BatchNormalization(),
            layers.ReLU(), layers.DepthwiseConv2D(3, padding="same"), layers.BatchNormalization(), layers.ReLU(6.0),
            layers.Conv2D(12, 1, activation="relu"), layers.AveragePooling2D(8), layers.Flatten(), layers.Dense(10),
            layers.Softmax()])

    class Subclassed(keras.Model):
        """A ``keras.Model`` subclass: its .keras / .h5 name the class but cannot rebuild it elsewhere."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(8, 3, strides=2, padding="same")
            self.norm = layers.BatchNormalization()
            self.depthwise = layers.DepthwiseConv2D(3, padding="same")
            self.pool = layers.GlobalAveragePooling2D()
            self.dense = layers.Dense(10)
            self.softmax = layers.Softmax()

        def logits(self, x, training=None):
            x = keras.ops.relu(self.norm(self.conv(x), training=training))
            return self.dense(self.pool(keras.ops.relu(self.depthwise(x))))

        def call(self, x, training=None):
            return self.softmax(self.logits(x, training=training))

    def subclassed():
        model = Subclassed()
        model(keras.ops.zeros((1, 16, 16, 3)))  # builds it (the shape it is exported with)
        return model

    return {"cnn": cnn, "kws": kws, "autoencoder": autoencoder, "sigmoid": sigmoid, "sequential": sequential,
            "subclassed": subclassed, "rescaled": rescaled,
            "flatten_dense": flatten_dense}


def _randomise_batchnorm(model, rng) -> None:
    """Non-trivial BatchNorm statistics, so that folding them matters."""
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.2, 0.2, beta.shape),
                               rng.uniform(-0.2, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


def main(out: Path, legacy: bool) -> None:
    import numpy as np
    import tensorflow as tf

    if legacy:
        import tf_keras as keras
    else:
        import keras
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    for name, build in _models(keras).items():
        if legacy and name != "kws":
            continue
        model = build()
        _randomise_batchnorm(model, rng)
        x = rng.normal(size=(4, *_input_shape(model))).astype(np.float32)
        if hasattr(model, "logits"):  # the subclassed model
            logits = lambda batch: model.logits(batch, training=False)  # noqa: E731
        elif model.layers[-1].__class__.__name__ == "Softmax":
            logits = keras.Model(model.inputs, model.layers[-2].output)
        else:
            logits = model
        layers = [layer.name for layer in model.layers if any("kernel" in getattr(w, "path", w.name) for w in layer.weights)]
        np.savez(out / f"{name}{'_legacy' if legacy else ''}.npz", x=x, logits=np.asarray(logits(x)), layers=layers)
        if legacy:
            model.save(out / f"{name}_legacy.h5")
            continue
        model.save(out / f"{name}.keras")
        model.save(out / f"{name}.h5")  # a subclassed model's too: Keras 3 writes it, nothing can read it back
        model.export(str(out / f"{name}_savedmodel"), verbose=False)
        (out / f"{name}.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        if name in ("sequential", "subclassed", "rescaled", "flatten_dense"):
            continue  # the constructions' own formats; dynamic range and ONNX are the functional models'
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
        (out / f"{name}_dynamic_range.tflite").write_bytes(converter.convert())
        import tf2onnx

        spec = (tf.TensorSpec(model.inputs[0].shape, tf.float32, name="input"),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
        (out / f"{name}_tf2onnx.onnx").write_bytes(proto.SerializeToString())


def _input_shape(model) -> tuple[int, ...]:
    """One sample's shape: a subclassed model has no Input, only the shape it was built with."""
    if hasattr(model, "logits"):
        return tuple(model.get_build_config()["input_shape"][1:])
    return tuple(model.inputs[0].shape[1:])


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--legacy" in sys.argv[2:])
