package dev.tombstone.testnode;

import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collections;
import java.util.List;

import org.elasticsearch.Version;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.common.transport.TransportAddress;
import org.elasticsearch.env.Environment;
import org.elasticsearch.http.HttpServerTransport;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.reindex.ReindexPlugin;
import org.elasticsearch.transport.Netty4Plugin;

/**
 * Starts one real Elasticsearch 7.17 node in this JVM, for the tests: the same protocol as the
 * OpenSearch launcher of tests/opensearch-node (one line
 * {@code ELASTICSEARCH_READY port=<http port> version=<version> distribution=elasticsearch} on
 * stdout when the node answers, logs on stderr, stops when stdin closes).
 *
 * <p>What was done, and what broke:
 *
 * <ul>
 *   <li>No maintained runner library covers 7.17 (codelibs' elasticsearch-cluster-runner stops
 *       at 7.10.2), so this subclasses {@link Node}, whose constructor taking classpath plugins
 *       is protected, with {@link InternalSettingsPreparer#prepareEnvironment}.
 *   <li>Maven Central has the 7.17 server and the transport-netty4 (HTTP) and reindex
 *       ({@code _delete_by_query}, {@code _tasks}) module jars, but not lang-painless nor
 *       analysis-common: neither is needed by the backend (the standard analyser that dynamic
 *       mapping's {@code text} uses is in the server).
 *   <li>{@code xpack.*} settings are unknown without the x-pack plugins (a start-up error):
 *       security is simply absent.
 *   <li>The server jar depends on log4j-api only: log4j-core is added for its logging.
 *   <li>The 7.17 jars are under the Elastic License 2.0 / SSPL: for tests, never shipped.
 * </ul>
 */
public final class EsLauncher {
  private EsLauncher() {}

  /** The constructor with classpath plugins is protected. */
  private static final class TestNode extends Node {
    TestNode(Environment env, List<Class<? extends Plugin>> plugins) {
      super(env, plugins, true);
    }
  }

  public static void main(String[] args) throws Exception {
    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    System.setOut(System.err);

    Path home = Files.createTempDirectory("tombstone-elasticsearch-");
    Settings settings =
        Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("cluster.name", "tombstone-test")
            .put("node.name", "node-1")
            .put("network.host", "127.0.0.1")
            .put("http.port", "0")
            .put("transport.port", "0")
            .put("discovery.type", "single-node")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .put("node.store.allow_mmap", false)
            .put("http.type", "netty4")
            .put("transport.type", "netty4")
            .build();
    Environment env =
        InternalSettingsPreparer.prepareEnvironment(
            settings, Collections.emptyMap(), null, () -> "node-1");
    Node node = new TestNode(env, List.of(Netty4Plugin.class, ReindexPlugin.class));
    Runtime.getRuntime().addShutdownHook(new Thread(() -> stop(node, home), "node-stop"));
    node.start();

    TransportAddress bound =
        node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress();
    out.println(
        "ELASTICSEARCH_READY port="
            + bound.getPort()
            + " version="
            + Version.CURRENT
            + " distribution=elasticsearch");

    InputStream in = System.in;
    byte[] buf = new byte[256];
    try {
      while (in.read(buf) >= 0) {
        // Only end of file matters.
      }
    } catch (IOException ignored) {
      // A broken pipe means the same as end of file.
    }
    System.exit(0);
  }

  private static void stop(Node node, Path home) {
    try {
      node.close();
    } catch (IOException | RuntimeException e) {
      System.err.println("elasticsearch-node: closing the node failed: " + e);
    }
    try (var paths = Files.walk(home)) {
      paths.sorted(java.util.Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
    } catch (IOException e) {
      System.err.println("elasticsearch-node: removing " + home + " failed: " + e);
    }
  }
}
