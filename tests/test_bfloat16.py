"""model.dtype bfloat16: the layers compute in bfloat16; weights, Adam's state and the loss maths stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import leaves, tiny_config, tiny_dataset

from vaecli.models.targets import root_key
from vaecli.models.vae import VAE
from vaecli.training.loop import ImageLosses, image_losses, split_model, train

# bfloat16 keeps 8 significant bits (a relative rounding of 2^-9, 0.2%), but the loss is summed in float32
# from float32 outputs: a fresh tiny model's mean loss agrees with float32's to 0.1% (measured: 0.0005% for
# the MLP, 0.002% for the conv model).
LOSS_RTOL = 1e-3
CONV = {"arch": "conv", "hidden": [8, 16]}  # two stages on 28x28 digits: 28 -> 14 -> 7


def test_bfloat16_trains_with_float32_weights_and_optimizer_state():
    config, dataset = tiny_config(model={"dtype": "bfloat16"}), tiny_dataset()
    epochs = []
    state = train(config, dataset, on_epoch_end=epochs.append).state

    assert int(state.step) == 16
    floating = [leaf for leaf in leaves((state.params, state.opt_state)) if np.issubdtype(leaf.dtype, np.floating)]
    assert len(floating) == 3 * len(leaves(state.params))  # the weights, Adam's two moments
    assert {leaf.dtype for leaf in floating} == {np.dtype(np.float32)}
    assert all(np.isfinite(leaf).all() for leaf in floating)
    val_losses = [result.metrics["val_loss"] for result in epochs]
    assert all(np.isfinite(val_losses)) and val_losses[1] < val_losses[0]


def fresh_model(model_settings: dict) -> VAE:
    """A VAE on 28x28 digits, initialised with XLA's RNG: JAX's default compiles code for every new weight shape,
    which costs seconds for a conv model; these tests compare arithmetic, not initialisations."""
    return VAE(tiny_config(model=model_settings).model, (28, 28), nnx.Rngs(jax.random.key(0, impl="rbg")))


def batch_losses(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[ImageLosses, str]:
    """image_losses() of 32 binarized digits under the model, and the text of the program that computes them."""
    images = tiny_dataset().train_images[:32]
    targets = jnp.asarray((images >= 128).reshape(32, -1), jnp.float32)

    def losses(params):
        return image_losses(nnx.merge(graphdef, params), targets, root_key(0))

    return jax.jit(losses)(params), str(jax.make_jaxpr(losses)(params))


@pytest.mark.parametrize("settings", [{"arch": "mlp"}, CONV], ids=["mlp", "conv"])
def test_bfloat16_layers_compute_in_bfloat16_and_the_loss_stays_float32_and_close(settings):
    graphdef_32, params = split_model(fresh_model(settings))
    # The same float32 weights in a bfloat16 model: only the arithmetic differs.
    graphdef_16 = split_model(nnx.eval_shape(lambda: fresh_model({**settings, "dtype": "bfloat16"})))[0]
    losses_32, program_32 = batch_losses(graphdef_32, params)
    losses_16, program_16 = batch_losses(graphdef_16, params)

    assert "bf16[" in program_16 and "bf16[" not in program_32
    for term in losses_16:  # the loss, the reconstruction, the KL
        assert term.dtype == jnp.float32 and np.isfinite(term).all()
    loss_32, loss_16 = float(jnp.mean(losses_32.loss)), float(jnp.mean(losses_16.loss))
    assert loss_16 != loss_32  # so the closeness below compares two different computations
    assert abs(loss_16 - loss_32) <= LOSS_RTOL * abs(loss_32), (loss_16, loss_32)


def test_a_bfloat16_model_returns_float32_posteriors_and_decoder_outputs():
    for settings in ({"arch": "mlp"}, CONV):
        model = fresh_model({**settings, "dtype": "bfloat16"})
        pixels = jax.ShapeDtypeStruct((2, 784), jnp.float32)
        mean, log_variance = jax.eval_shape(model.encode, pixels)
        decoded = jax.eval_shape(model.decode, jax.ShapeDtypeStruct((3, 2, 4), jnp.float32))
        assert (mean.dtype, log_variance.dtype, decoded.dtype) == (jnp.float32,) * 3
        assert decoded.shape == (3, 2, 784)
