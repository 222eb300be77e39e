"""Train a MobileNet: ``python train.py --config configs/v1.py --workdir DIR``.

Any config field can be overridden (``--config.batch_size=512``,
``--config.model.width=0.5``), and variants are config strings
(``--config configs/v1.py:width=0.5,resolution=160``). Multi-process runs:
``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or detected on
TPU pods and SLURM). The same command is ``mobilenet-jax train``; the training loop
is :mod:`mobilenet_jax.training.loop`.
"""

from mobilenet_jax import cli

if __name__ == "__main__":
    cli.train_command()
