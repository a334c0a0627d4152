"""The families of this package, by name: where each adapter is, and the transformers modules its file loads.

    family -> ("module:class" of its Adapter, the transformers modules the file imports)

The one list a new family is added to. From it: conngeo.families.adapter_class imports a family's file on first
use (a stage loads only its model's transformers classes), the zoo stage fingerprints an entry by its family's
files (conngeo.zoo.train.code_files), and scripts/warm.py imports the transformers modules ahead of every stage.
Plain data, no imports: scripts/warm.py reads this file without importing conngeo.
"""

FAMILIES = {
    "llava": ("conngeo.families.llava:LlavaAdapter", ("transformers.models.llava.modeling_llava",)),
    "idefics2": ("conngeo.families.idefics2:Idefics2Adapter", ("transformers.models.idefics2.modeling_idefics2",)),
    "qwen2.5vl": ("conngeo.families.qwen2_5_vl:Qwen2_5_VLAdapter",
                  ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",)),
    "qwen3.5": ("conngeo.families.qwen3_5:Qwen3_5Adapter", ("transformers.models.qwen3_5.modeling_qwen3_5",)),
    # a base model's connector replaced by another kind (conngeo.families.variant): loads its base's family
    "variant": ("conngeo.families.variant:ConnectorVariant", ()),
}
