"""fracgpu.slurm's readers of Slurm's configuration: hostlist expressions, gres.conf for one node,
the node's fracgpu.conf."""

from __future__ import annotations

import pytest

from fracgpu import slurm


@pytest.mark.parametrize("expression, names", [
    ("node1", ["node1"]),
    ("node[1-4,7]", ["node1", "node2", "node3", "node4", "node7"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[1-10]", [f"node{n}" for n in range(1, 11)]),
    ("gpu01,node[2-3],login", ["gpu01", "node2", "node3", "login"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("/dev/nvidia[0-3]", ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3"]),
])
def test_hostlists_expand_as_slurm_writes_them(expression, names):
    assert slurm.expand_hostlist(expression) == names


@pytest.mark.parametrize("expression, phrase", [
    ("node[1-4", "without its ']'"),
    ("node1-4]", "without its '['"),
    ("node[a-b]", "is not a number"),
    ("node[4-1]", "goes down"),
    ("node[0-99999999]", "over 65536 names"),
    ("node1,,node2", "an empty name"),
])
def test_a_malformed_hostlist_is_refused(expression, phrase):
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        slurm.expand_hostlist(expression)


def test_gres_conf_counts_the_lines_of_this_node_and_those_of_every_node(tmp_path):
    conf = tmp_path / "gres.conf"
    conf.write_text("NodeName=a[1-2] Name=gpu File=/dev/nvidia[0-1]   # two GPUs\n"
                    "NodeName=a[1-2] Name=shard Count=16\n"
                    "NodeName=b Name=gpu Count=4\n"
                    "Name=shard Count=8   # every node\n"
                    "NodeName=c Name=gpu File=/dev/nvidia0,/dev/nvidia1\n"
                    "NODENAME=c NAME=shard COUNT=1K\n")
    assert slurm.shards_per_gpu_from_gres(str(conf), "a2") == (16 + 8) // 2
    assert slurm.shards_per_gpu_from_gres(str(conf), "b") == 8 // 4
    assert slurm.shards_per_gpu_from_gres(str(conf), "c") == (1024 + 8) // 2
    with pytest.raises(ValueError, match="for node 'a3'"):
        slurm.shards_per_gpu_from_gres(str(conf), "a3")    # only the shards of every node, and no GPU
    conf.write_text("Name=gpu File=/dev/nvidia0\nName=shard Count=many\n")
    with pytest.raises(ValueError, match="gres.conf:2: Count='many' is not a number"):
        slurm.shards_per_gpu_from_gres(str(conf), "a1")


def test_gres_conf_is_beside_slurm_conf():
    assert slurm.gres_conf_path({"SLURM_CONF": "/run/slurm/conf/slurm.conf"}) == "/run/slurm/conf/gres.conf"
    assert slurm.gres_conf_path({}) == "/etc/slurm/gres.conf"


def test_the_node_name_is_slurmds():
    assert slurm.node_name({"SLURMD_NODENAME": "node7"}) == "node7"
    import socket

    assert slurm.node_name({}) == socket.gethostname().split(".", 1)[0]


def test_the_config_holds_node_settings_and_options_win(tmp_path):
    path = tmp_path / "fracgpu.conf"
    path.write_text("# node\nFRACGPU_STATE_DIR = /var/lib/fracgpu   # shared\n\nFRACGPU_STATE_GROUP=gpu\n")
    node = slurm.read_config(path)
    assert dict(node.values) == {"FRACGPU_STATE_DIR": "/var/lib/fracgpu", "FRACGPU_STATE_GROUP": "gpu"}
    node = node.with_options(FRACGPU_STATE_DIR="/srv/fracgpu", FRACGPU_STATE_GROUP=None)
    assert dict(node.values) == {"FRACGPU_STATE_DIR": "/srv/fracgpu", "FRACGPU_STATE_GROUP": "gpu"}
    with pytest.raises(ValueError, match="FRACGPU_MEMORY is not a node setting"):
        node.with_options(FRACGPU_MEMORY="1GiB")
