"""ComfyUI node classes (thin wrappers over the gpen library)."""

from . import gpen_nodes, host, segs_nodes

host.register_model_folders()

NODE_CLASS_MAPPINGS = {**gpen_nodes.NODE_CLASS_MAPPINGS, **segs_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**gpen_nodes.NODE_DISPLAY_NAME_MAPPINGS, **segs_nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
