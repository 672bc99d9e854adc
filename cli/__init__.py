"""lmcompress.cli"""
