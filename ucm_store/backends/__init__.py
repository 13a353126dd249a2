"""Store tiers: Cache (pinned DRAM), Posix and NFS (block files); see ``base.py`` for the interface."""
