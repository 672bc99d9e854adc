"""lmcompress.turbo"""
