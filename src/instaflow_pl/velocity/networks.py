"""TEMPORARY shim while branches merge (removed before commit)."""

from instaflow_pl.families import LatentGeometry, latent_geometry, network_from_config  # noqa: F401


def load_network(root, subfolder="unet", torch_dtype=None):
    from instaflow_pl.model_folder import ModelFolder

    return ModelFolder.open(root).load_network(torch_dtype)
