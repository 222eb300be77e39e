"""Data: the preprocessing value type (no TensorFlow), the tf.data input pipeline and the embedded dataset."""
