"""scripts/knn_vs_timm.py: timm's model and tinyvit on the same CIFAR-10 pixels give the same k-NN accuracy."""
import pytest
from helpers import last_json, run_script

pytestmark = pytest.mark.e2e


def test_timm_and_tinyvit_agree_on_real_cifar10(cifar_root, ti16):
    r = run_script("knn_vs_timm.py", ti16, "--train", "40", "--test", "10", "--k", "5,10", "--json",
                   extra_env={"TINYVIT_DATA": str(cifar_root)})
    res = last_json(r)
    assert res["max_feature_difference"] < 1e-4
    assert res["tinyvit"] == res["timm"]
    assert res["tinyvit"]["10"]["top1"] > 0.5  # pretrained features, not noise
