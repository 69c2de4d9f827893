"""Ray glue: the cluster session, placement, actor groups and weight sync (DESIGN.md, Topology)."""
