"""Integrations that patch third-party models in place to use rpp_kernels (and can be undone).

- :mod:`~rpp_kernels.integrations.open_clip`: deep vision prompts on CLIP ``VisionTransformer`` s (open_clip's and
  OpenAI's): ``apply_vision_prompts`` / ``remove_vision_prompts``.
- :mod:`~rpp_kernels.integrations.openai_clip`: OpenAI ``clip/model.py`` (and its vendored copies, recognised by
  structure) entry points, and ``patch_blocks`` / ``unpatch_blocks`` for prompt-taking CLIP residual blocks.
- :mod:`~rpp_kernels.integrations.timm`: VPT/SPT prompts on timm ``VisionTransformer`` s: ``add_prompts`` /
  ``remove_prompts``.
"""
