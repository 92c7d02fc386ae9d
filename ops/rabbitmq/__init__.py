"""RabbitMQ for hotq: definitions for a site, and a local three-node cluster (local_cluster.py)."""
