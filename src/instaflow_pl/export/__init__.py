"""Export a training checkpoint as a diffusers-format model folder (the student, or the next round's teacher).

``instaflow-pl export --ckpt CKPT --out DIR`` writes::

    DIR/<network folder>/       the velocity network (EMA weights when the run kept one): the family's ``unet/`` or
                                ``transformer/``, safetensors
    DIR/vae/ text_encoder/ tokenizer/ ...   copied from the checkpoint's base model (the family's parts)
    DIR/scheduler/              a FlowMatchEulerDiscreteScheduler config (shift 1)
    DIR/model_index.json        names InstaFlowPipeline (or the shipped pipeline file) and the parts
    DIR/instaflow_pipeline.py   families whose stock pipeline cannot sample the export (``Family.standalone_pipeline``)
    DIR/instaflow.json          marks DIR as a velocity (k-RF) model: module kind, base model, steps, stages
    DIR/README.md               a model card; its "Use" section is the family's (``Family.card_use``)

The folder loads with ``InstaFlowPipeline.from_pretrained(DIR)``, with the family's stock network class, and with
``load_teacher(DIR)`` (so an export is the teacher of the next pair-generation round and the ``base_model`` of the
next training stage). How stock diffusers alone samples it is the family's to say, in the card. With
``--lora-format file``, a LoRA run exports its adapters alone instead (``pytorch_lora_weights.safetensors``); with
``--format delta``, the trained network minus its base model's (``delta_weights.safetensors``, PeRFlow's delta
weights), which ``--apply-delta DELTA --to MODEL`` (:func:`apply_delta`) adds to the base or another fine-tune of it.

The modules, one job each: :mod:`.checkpoint` (what the checkpoint gives: the network with the exported weights and the
facts to record), :mod:`.folder` (the diffusers folder), :mod:`.lora` (the LoRA file), :mod:`.delta` (delta weights),
:mod:`.cards` (model cards), :mod:`.run` (one all-or-nothing export), :mod:`.command` (the command line). The
checkpoint's record and the safe reader are :mod:`instaflow_pl.checkpoints`'.
"""

from instaflow_pl.export.run import apply_delta, export_checkpoint

__all__ = ["apply_delta", "export_checkpoint"]
