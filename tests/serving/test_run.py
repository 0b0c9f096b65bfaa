"""``llava-ray serve``'s settings before anything starts: the Serve config it deploys, and the vLLM option."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from llava_ray.cli import main
from llava_ray.config import ConfigError
from llava_ray.config.serve import ServeConfig
from llava_ray.serving.app import build_app, deployment_options, served_model_name
from llava_ray.serving.run import check_vllm_config, serve_deploy_config, vllm_llm_config

SEVEN_B = "jobs/configs/llava-1.5-7b/serve.yaml"


def printed_config(capsys, *argv: str) -> dict:
    assert main(["serve", "--print-config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_a_serve_deploy_config_of_the_llava_ray_app(capsys):
    printed = printed_config(capsys, "--config", SEVEN_B, "--port", "9000")
    ServeDeploySchema.model_validate(printed)
    (app,) = printed["applications"]
    assert app["import_path"] == "llava_ray.serving.app:build_app"
    assert printed["http_options"] == {"host": "127.0.0.1", "port": 9000}
    config = ServeConfig.model_validate(app["args"])  # the builder's args are the serve section
    assert config.model == "s3://my-llava-bucket/runs/llava-1.5-7b-finetune/final"
    options = deployment_options(config)
    assert options["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    build_app(app["args"])  # Ray accepts the deployment's options (nothing is loaded until it runs)


def test_replicas_and_gpus_come_from_the_config():
    config = ServeConfig(model="/m/run/final", num_replicas=3, num_gpus_per_replica="auto")
    options = deployment_options(config)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_gpus"] == 0  # no Ray cluster with GPUs here
    assert served_model_name(config) == "run"
    assert served_model_name(ServeConfig(model="s3://b/runs/llava-7b/final/hf")) == "llava-7b"
    assert served_model_name(ServeConfig(model="/m/run/final", model_name="mine")) == "mine"


def test_bad_serve_settings_exit_2_listing_each_problem(capsys):
    assert main(["serve", "--print-config", "serve.max_batch_size=64", "serve.port=0"]) == 2
    error = capsys.readouterr().err
    assert "serve.port = 0: Input should be greater than or equal to 1" in error
    assert main(["serve", "--print-config", "serve.max_batch_size=64"]) == 2
    error = capsys.readouterr().err
    assert "serve.model is unset; pass --model DIR" in error
    assert "serve.max_ongoing_requests=32 < serve.max_batch_size=64" in error
    with pytest.raises(ValueError, match=r"serve.model is unset"):
        build_app({})


def test_vllm_option_is_ray_serve_llm_with_a_valid_llm_config(capsys):
    printed = printed_config(
        capsys, "--config", SEVEN_B, "serve.backend=vllm", "serve.model=s3://my-llava-bucket/runs/x/final/hf"
    )
    ServeDeploySchema.model_validate(printed)
    (app,) = printed["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {
        "model_id": "llava-1.5-7b",
        "model_source": {"bucket_uri": "s3://my-llava-bucket/runs/x/final/hf"},
    }
    assert llm["accelerator_type"] == "H100" and llm["engine_kwargs"]["max_model_len"] == 4096
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4


def test_vllm_settings_ray_refuses_are_config_errors(tmp_path):
    bad = ServeConfig(model="/m/run/final/hf", backend="vllm", vllm={"accelerator_type": "H1000"})
    with pytest.raises(ConfigError, match=r"accelerator_type.*Unsupported accelerator type: H1000"):
        check_vllm_config(bad)
    ours = tmp_path / "final"
    ours.mkdir()
    (ours / "llava_ray_config.json").write_text("{}")
    with pytest.raises(
        ConfigError, match=r"vLLM loads the Hugging Face export; point serve.model at .*final/hf"
    ):
        serve_deploy_config(ServeConfig(model=str(ours), backend="vllm"))
    local = vllm_llm_config(ServeConfig(model="/models/run/final/hf", backend="vllm"))
    assert local["model_loading_config"]["model_source"] == "/models/run/final/hf"
