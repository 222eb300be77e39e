"""Train a MobileNet: ``python train.py --config configs/v1.py --workdir DIR``.

Any config field can be overridden (``--config.batch_size=512``,
``--config.model.width=0.5``), and variants are config strings
(``--config configs/v1.py:width=0.5,resolution=160``). Multi-process runs:
``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or detected on
TPU pods and SLURM).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mobilenet_jax import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/v1.py or configs/v2.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the progress bar and metrics.jsonl report progress
    from mobilenet_jax import host

    host.configure_cpu_allocator()  # before XLA starts its threads; see host.py for the measured effect
    host.enable_compilation_cache(FLAGS.config.compilation_cache_dir)
    import tensorflow as tf

    # TensorFlow only feeds data; keep it off the accelerators JAX uses.
    tf.config.experimental.set_visible_devices([], "GPU")

    from mobilenet_jax import distributed, training

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(errors.absl_main(main), flags_parser=errors.parse_absl_flags)
