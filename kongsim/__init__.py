"""A Kong Gateway stand-in that drives real plugin-server processes over the MsgPack:1 socket protocol."""
