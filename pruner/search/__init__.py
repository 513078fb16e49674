"""MSP's evolutionary search: the genomes, the (mu+lambda) evolution, candidate fitness, level probes, resumable
search sessions.
"""
